"""Capture privileges: what to tell an operator without them, and dropping root after opening the socket."""
from __future__ import annotations

import ctypes
import logging
import os
import pwd
import sys
from typing import Sequence

from .frames import SourceError

log = logging.getLogger(__name__)

# <linux/capability.h>, <linux/prctl.h>
CAP_NET_RAW = 13
PR_SET_KEEPCAPS = 8
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class CapturePermissionError(SourceError):
    """The process may not open a packet socket (no CAP_NET_RAW)."""


def permission_message(interface: str, platform: str = sys.platform) -> str:
    """One line telling how this platform grants what capturing needs."""
    if platform == "darwin" or "bsd" in platform:
        return (f"cannot capture on {interface}: permission denied, capturing needs read access to /dev/bpf*; "
                f"run with sudo, or give your group access to the BPF devices (on macOS: Wireshark's "
                f"ChmodBPF package)")
    if platform == "win32":
        return (f"cannot capture on {interface}: permission denied; install Npcap, and run as Administrator "
                f"if Npcap was installed for administrators only")
    python = os.path.realpath(sys.executable)
    return (f"cannot capture on {interface}: permission denied, a packet socket needs CAP_NET_RAW; "
            f"run as root (sudo), or grant it once with 'sudo setcap cap_net_raw+ep {python}', "
            f"or in a container add 'cap_add: [NET_RAW]' (docker compose)")


class _CapabilityHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapabilityData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def resolve_user(name: str) -> tuple[int, int]:
    """(uid, gid) of a user name or numeric id; KeyError when unknown."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if not name.isdigit():
            raise
        entry = pwd.getpwuid(int(name))
    return entry.pw_uid, entry.pw_gid


def drop_privileges(user: str, keep: Sequence[int] = (CAP_NET_RAW,)) -> bool:
    """Become ``user`` (no supplementary groups), keeping only the capabilities in ``keep``.

    Like ``tcpdump -Z``, but CAP_NET_RAW survives the switch (PR_SET_KEEPCAPS, then capset) so the
    capture can reopen its socket when an interface comes back. Capabilities are per thread: the
    calling thread, and the threads it starts afterwards (the capture thread), keep ``keep``;
    threads already running (waitress's workers) switch user too, since glibc applies setuid to
    every thread, and lose every capability. Returns whether the capabilities were kept.
    """
    uid, gid = resolve_user(user)
    libc = ctypes.CDLL(None, use_errno=True)
    kept = libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) == 0
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if kept:
        header = _CapabilityHeader(LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapabilityData * 2)()
        for capability in keep:
            data[capability // 32].effective |= 1 << capability % 32
            data[capability // 32].permitted |= 1 << capability % 32
        kept = libc.capset(ctypes.byref(header), data) == 0
        libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)
    if not kept:
        log.warning("could not keep CAP_NET_RAW after switching to %s: the capture cannot reopen its socket "
                    "after an interface loss", user)
    return kept
