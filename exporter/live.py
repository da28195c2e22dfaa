"""Live capture from a network interface through a raw AF_PACKET socket (see packet(7)).

Scapy finds the interface and its addresses and compiles the BPF filter (through libpcap); the
socket itself is read here with plain ``recvmsg_into`` calls so the per-frame cost stays small.
The kernel hands a packet socket frames that differ from what is on the wire in two ways, both
undone here the way libpcap does it:

- VLAN tags stripped by the NIC or by veth arrive out of band, in a ``tpacket_auxdata`` control
  message; the 4-byte tag is put back after the MAC addresses (and counted in the length).
- GRO/TSO aggregates can be far larger than the MTU; a 256 KiB buffer holds them, and the frame's
  full length comes from ``tp_len`` whatever was copied.
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import pwd
import re
import select
import socket
import struct
import sys
import threading
import time
from typing import Iterator, NamedTuple, Optional, Sequence

from .decode import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_RAW
from .sources import Frame, SourceError

log = logging.getLogger(__name__)

ANY_INTERFACE = "any"
BATCH_FRAMES = 4096
IDLE_SECONDS = 0.5
COALESCE_SECONDS = 0.02
RECEIVE_BUFFER = 1 << 18  # holds a 64 KiB GRO/TSO aggregate, and BIG TCP's larger ones
SOCKET_BUFFER_BYTES = 256 << 20  # kernel queue; granted beyond net.core.rmem_max only with CAP_NET_ADMIN
MAXIMUM_SNAPLEN = 262144  # libpcap's: a filter's "accept" never trims below this

# <linux/if_ether.h>, <linux/if_packet.h>, <linux/socket.h>, <asm-generic/socket.h>
ETH_P_ALL = 0x0003
ETH_P_8021Q = 0x8100
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
AUXDATA = struct.Struct("=IIIHHHH")  # tp_status, tp_len, tp_snaplen, tp_mac, tp_net, tp_vlan_tci, tp_vlan_tpid
TPACKET_STATS = struct.Struct("=II")  # tp_packets, tp_drops
BPF_INSTRUCTION = struct.Struct("=HBBI")  # code, jt, jf, k
SLL_HEADER = struct.Struct("!HHH8sH")  # pkttype, hatype, address length, address, protocol
SLL_HEADER_LENGTH = 16

# <linux/if_arp.h> hardware types -> what a SOCK_RAW socket delivers; other types are read cooked.
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
ARPHRD_RAWIP = 519
ARPHRD_NONE = 0xFFFE
RAW_LINK_TYPES = {ARPHRD_ETHER: LINKTYPE_ETHERNET, ARPHRD_LOOPBACK: LINKTYPE_ETHERNET,
                  ARPHRD_RAWIP: LINKTYPE_RAW, ARPHRD_NONE: LINKTYPE_RAW}
# Where a re-inserted VLAN tag goes: after the MAC addresses, or after SLL's header minus its protocol.
VLAN_OFFSETS = {LINKTYPE_ETHERNET: 12, LINKTYPE_LINUX_SLL: 14}
IFF_UP = 0x1

# Errors meaning "the interface went away or down": the capture restarts when it is back.
INTERFACE_GONE = frozenset((errno.ENETDOWN, errno.ENODEV, errno.ENXIO))

# /proc/net/route flags <linux/route.h>
RTF_UP = 0x0001
RTF_REJECT = 0x0200

# <linux/capability.h>, <linux/prctl.h>
CAP_NET_RAW = 13
PR_SET_KEEPCAPS = 8
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class InterfaceNotFound(SourceError):
    """The capture interface does not exist (at start-up: a configuration error)."""


class FilterError(SourceError):
    """The BPF filter does not compile; the message is the compiler's."""


class CapturePermissionError(SourceError):
    """The process may not open a packet socket (no CAP_NET_RAW)."""


class Interface(NamedTuple):
    """What the capture needs to know about an interface, read through Scapy's netlink provider."""

    name: str
    index: int
    hardware_type: int  # ARPHRD_*
    up: bool
    addresses: tuple[str, ...]  # IPv4 and IPv6, as the kernel lists them


def list_interfaces() -> dict[str, Interface]:
    """Every interface of this network namespace, read fresh (an interface may come and go)."""
    from scapy.arch.linux import LinuxInterfaceProvider

    found = {}
    for name, iface in LinuxInterfaceProvider().load().items():
        addresses = tuple(address for version in (4, 6) for address in iface.ips.get(version, ()))
        found[name] = Interface(name, iface.index, iface.type, bool(int(iface.flags) & IFF_UP), addresses)
    return found


def server_addresses(interface: str) -> tuple[str, ...]:
    """The default server set: the interface's IPv4 and global IPv6 addresses (all interfaces for ``any``).

    Link-local IPv6 addresses are left out (they carry neighbour discovery, not clients), and so are
    loopback addresses when capturing on ``any``.
    """
    interfaces = list_interfaces()
    if interface == ANY_INTERFACE:
        candidates = [address for iface in interfaces.values() for address in iface.addresses]
    elif interface in interfaces:
        candidates = list(interfaces[interface].addresses)
    else:
        raise InterfaceNotFound(_not_found_message(interface, interfaces))
    chosen = []
    for text in candidates:
        address = ipaddress.ip_address(text.split("%")[0])
        if address.version == 6 and address.is_link_local:
            continue
        if interface == ANY_INTERFACE and address.is_loopback:
            continue
        if str(address) not in chosen:
            chosen.append(str(address))
    return tuple(chosen)


def default_route_interface(route_text: str, ipv6_route_text: str = "") -> Optional[str]:
    """The interface of the IPv4 default route with the lowest metric, else of the IPv6 one.

    Parses the text of ``/proc/net/route`` and ``/proc/net/ipv6_route``.
    """
    best: Optional[tuple[int, str]] = None
    for line in route_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        name, destination, flags, metric, mask = fields[0], fields[1], fields[3], fields[6], fields[7]
        try:
            if int(destination, 16) or int(mask, 16) or not int(flags, 16) & RTF_UP:
                continue
            candidate = (int(metric), name)
        except ValueError:
            continue
        if best is None or candidate < best:
            best = candidate
    if best is not None:
        return best[1]
    for line in ipv6_route_text.splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        destination, prefix_length, metric, flags, name = fields[0], fields[1], fields[5], fields[8], fields[9]
        try:
            if int(destination, 16) or int(prefix_length, 16) or name == "lo":
                continue
            if not int(flags, 16) & RTF_UP or int(flags, 16) & RTF_REJECT:
                continue
            candidate = (int(metric, 16), name)
        except ValueError:
            continue
        if best is None or candidate < best:
            best = candidate
    return best[1] if best else None


def default_interface() -> str:
    """The interface holding the default route, read from /proc; SourceError when there is none."""
    texts = []
    for path in ("/proc/net/route", "/proc/net/ipv6_route"):
        try:
            with open(path) as file:
                texts.append(file.read())
        except OSError:
            texts.append("")
    name = default_route_interface(*texts)
    if name is None:
        raise InterfaceNotFound("no default route to pick a capture interface from; pass --interface NAME")
    return name


def parse_auxdata(data: bytes) -> tuple[int, Optional[tuple[int, int]]]:
    """Read a ``tpacket_auxdata``: (frame length before any trimming, (VLAN TPID, TCI) or None)."""
    status, length, _snaplen, _mac, _net, tci, tpid = AUXDATA.unpack_from(data)
    if not (tci or status & TP_STATUS_VLAN_VALID):  # libpcap's VLAN_VALID
        return length, None
    return length, (tpid if status & TP_STATUS_VLAN_TPID_VALID else ETH_P_8021Q, tci)


def insert_vlan_tag(frame: bytes, offset: int, tpid: int, tci: int) -> bytes:
    """Put back a VLAN tag the kernel moved out of band, at ``offset`` (12 for Ethernet, 14 for SLL)."""
    return frame[:offset] + struct.pack("!HH", tpid, tci) + frame[offset:]


def sll_header(pkttype: int, hatype: int, address: bytes, protocol: int) -> bytes:
    """The 16-byte LINKTYPE_LINUX_SLL header libpcap builds from a packet socket's sockaddr_ll."""
    return SLL_HEADER.pack(pkttype, hatype, len(address), address[:8], protocol)


def restore_frame(link_type: int, data: bytes, received: int, auxdata: Optional[bytes],
                  address: tuple) -> tuple[int, bytes]:
    """(wire length, frame bytes) as libpcap records them, from what one recvmsg returned.

    ``received`` is recvmsg's result with MSG_TRUNC, ``auxdata`` the PACKET_AUXDATA payload and
    ``address`` Python's sockaddr_ll tuple (interface, protocol, pkttype, hatype, hardware address).
    Cooked frames get an SLL header; a VLAN tag the kernel stripped is put back (+4 bytes).
    """
    wire_length, tag = received, None
    if auxdata is not None:
        wire_length, tag = parse_auxdata(auxdata)
    if link_type == LINKTYPE_LINUX_SLL:
        data = sll_header(address[2], address[3], address[4], address[1]) + data
        wire_length += SLL_HEADER_LENGTH
    if tag is not None:
        offset = VLAN_OFFSETS.get(link_type)
        if offset is not None and len(data) >= offset:
            data = insert_vlan_tag(data, offset, *tag)
            wire_length += 4
    return wire_length, data


def compile_bpf(expression: str, link_type: int) -> list[tuple[int, int, int, int]]:
    """Compile a filter with libpcap (through Scapy) for frames of ``link_type``; FilterError if invalid."""
    from scapy.arch.common import compile_filter
    from scapy.arch.common import free_filter
    from scapy.error import Scapy_Exception

    try:
        program = compile_filter(expression, linktype=link_type)
    except (Scapy_Exception, OSError, ImportError) as error:
        text = str(error)
        match = re.search(r"\((.*)\)$", text)
        raise FilterError(f"invalid BPF filter {expression!r}: {match.group(1) if match else text}") from None
    try:
        return [(program.bf_insns[i].code, program.bf_insns[i].jt, program.bf_insns[i].jf,
                 program.bf_insns[i].k & 0xFFFFFFFF) for i in range(program.bf_len)]
    finally:
        free_filter(program)


# BPF opcode fields <linux/filter.h>
BPF_LD, BPF_LDX, BPF_RET = 0x00, 0x01, 0x06
BPF_ABS, BPF_IND, BPF_MSH = 0x20, 0x40, 0xA0
BPF_K = 0x00
SKF_AD_OFF = -0x1000 & 0xFFFFFFFF
SKF_AD_PROTOCOL, SKF_AD_PKTTYPE = 0, 4


def adapt_bpf_for_kernel(program: list[tuple[int, int, int, int]], cooked: bool) -> list[tuple[int, int, int, int]]:
    """Adjust a libpcap program for the kernel socket filter, as libpcap's ``fix_program`` does.

    Returns never trim (the kernel would cut frames to the snap length). In cooked mode the
    kernel filters the network-layer payload, without the 16-byte SLL header the program was
    compiled for: payload offsets move down 16, and the SLL packet type and protocol fields become
    the kernel's ancillary loads. A program reading other SLL fields cannot run in the kernel.
    """
    adapted = []
    for code, jt, jf, k in program:
        kind = code & 0x07
        if kind == BPF_RET and code & 0x18 == BPF_K and k:
            k = MAXIMUM_SNAPLEN
        elif cooked and kind in (BPF_LD, BPF_LDX) and code & 0xE0 in (BPF_ABS, BPF_IND, BPF_MSH) \
                and k < SKF_AD_OFF:
            if k >= SLL_HEADER_LENGTH:
                k -= SLL_HEADER_LENGTH
            elif k == 0:
                k = SKF_AD_OFF + SKF_AD_PKTTYPE
            elif k == 14:
                k = SKF_AD_OFF + SKF_AD_PROTOCOL
            else:
                raise FilterError("this filter reads link-layer fields that a cooked capture (interface any "
                                  "or a non-Ethernet interface) cannot filter in the kernel")
        adapted.append((code, jt, jf, k))
    return adapted


def attach_bpf(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """Attach a compiled program to a socket (SO_ATTACH_FILTER takes a struct sock_fprog)."""
    instructions = ctypes.create_string_buffer(b"".join(BPF_INSTRUCTION.pack(*insn) for insn in program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    struct.pack("HL", len(program), ctypes.addressof(instructions)))


def _not_found_message(name: str, interfaces: dict) -> str:
    return f"no interface named {name!r} (available: {', '.join(sorted(interfaces)) or 'none'}, any)"


def permission_message(interface: str) -> str:
    """One line telling how to grant what a packet socket needs."""
    python = os.path.realpath(sys.executable)
    return (f"cannot capture on {interface}: permission denied, a packet socket needs CAP_NET_RAW; "
            f"run as root (sudo), or grant it once with 'sudo setcap cap_net_raw,cap_net_admin+eip {python}', "
            f"or in a container add 'cap_add: [NET_RAW, NET_ADMIN]' (docker compose)")


class LiveSource:
    """Frames of one interface (or ``any``), read from an AF_PACKET socket.

    The socket is opened by the constructor, so start-up fails early on a missing interface, a bad
    filter or missing privileges. After an error ``open()`` reopens it; Capture calls it on restart.
    """

    kind = "live"

    def __init__(self, interface: str, bpf_filter: str = "", *, socket_buffer: int = SOCKET_BUFFER_BYTES):
        self.name = interface
        self.filter = bpf_filter
        self.socket_buffer = socket_buffer
        self._socket: Optional[socket.socket] = None
        self._dropped = 0
        self._program_for: dict[int, list] = {}
        self._view = memoryview(bytearray(RECEIVE_BUFFER))
        # An interface that exists but is down is not a start-up error: the capture reports it and
        # starts counting once the interface is up.
        self._open(require_up=False)

    def open(self) -> "LiveSource":
        """Open the socket if it is closed; SourceError (or a subclass) while that is impossible."""
        return self._open(require_up=True)

    def _open(self, require_up: bool) -> "LiveSource":
        if self._socket is not None:
            return self
        if self.name == ANY_INTERFACE:
            self.link_type, self._loopback_name = LINKTYPE_LINUX_SLL, _loopback_name()
            sock = self._new_socket(socket.SOCK_DGRAM, "")
        else:
            interface = list_interfaces().get(self.name)
            if interface is None:
                raise InterfaceNotFound(_not_found_message(self.name, list_interfaces()))
            if require_up and not interface.up:
                raise SourceError(f"{self.name}: interface is down; capture resumes when it is up")
            self.link_type = RAW_LINK_TYPES.get(interface.hardware_type, LINKTYPE_LINUX_SLL)
            self._loopback_name = interface.name if interface.hardware_type == ARPHRD_LOOPBACK else None
            kind = socket.SOCK_DGRAM if self.link_type == LINKTYPE_LINUX_SLL else socket.SOCK_RAW
            sock = self._new_socket(kind, self.name)
        self._socket = sock
        log.debug("capture socket open on %s (link type %d)", self.name, self.link_type)
        return self

    def _new_socket(self, kind: int, interface: str) -> socket.socket:
        program = None
        if self.filter:
            program = self._program_for.get(self.link_type)
            if program is None:
                # Compiled once per link type and kept: a restart needs no libpcap (nor privileges).
                program = adapt_bpf_for_kernel(compile_bpf(self.filter, self.link_type),
                                               cooked=self.link_type == LINKTYPE_LINUX_SLL)
                self._program_for[self.link_type] = program
        try:
            # Bound to an interface: protocol 0 receives nothing until bind(), so no frame of another
            # interface slips in first. Unbound (any): frames queued before the filter is attached
            # are drained.
            sock = socket.socket(socket.AF_PACKET, kind, 0 if interface else socket.htons(ETH_P_ALL))
        except PermissionError:
            raise CapturePermissionError(permission_message(self.name)) from None
        except OSError as error:
            raise SourceError(f"cannot open a packet socket: {error.strerror}") from None
        try:
            sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            self._grow_buffer(sock)
            if program:
                attach_bpf(sock, program)
            if interface:
                sock.bind((interface, ETH_P_ALL))
            elif program:
                _drain(sock)
        except OSError as error:
            sock.close()
            if error.errno in INTERFACE_GONE:
                raise InterfaceNotFound(f"{self.name}: interface not available ({error.strerror})") from None
            raise SourceError(f"{self.name}: cannot set up the capture socket: {error.strerror}") from None
        return sock

    def _grow_buffer(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.socket_buffer)
        except OSError:  # no CAP_NET_ADMIN: the kernel caps SO_RCVBUF at net.core.rmem_max
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.socket_buffer)
            granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
            if granted < self.socket_buffer:
                log.info("socket receive buffer limited to %d KiB by net.core.rmem_max (no CAP_NET_ADMIN)",
                         granted >> 10)

    def close(self) -> None:
        """Close the socket, keeping its drop count."""
        if self._socket is not None:
            self._read_drops()
            self._socket.close()
            self._socket = None

    def kernel_dropped(self) -> int:
        """Frames the kernel dropped for lack of buffer space, cumulative over reopenings."""
        self._read_drops()
        return self._dropped

    def _read_drops(self) -> None:
        if self._socket is None:
            return
        try:
            stats = self._socket.getsockopt(SOL_PACKET, PACKET_STATISTICS, TPACKET_STATS.size)
        except OSError:
            return
        self._dropped += TPACKET_STATS.unpack(stats)[1]  # reading resets the kernel's counters

    def batches(self, stop: threading.Event) -> Iterator[list[Frame]]:
        """Yield frames as they arrive, in batches; ``[]`` after each idle half second."""
        self.open()
        try:
            poller = select.poll()
            poller.register(self._socket, select.POLLIN)
            idle_ms = int(IDLE_SECONDS * 1000)
            while not stop.is_set():
                if not poller.poll(idle_ms):
                    yield []
                    continue
                batch = self._read_batch()
                if batch:
                    yield batch
                if len(batch) < BATCH_FRAMES:
                    # The queue is drained: let frames gather in the kernel's buffer for a moment, so
                    # per-batch costs (system calls, tally lock) spread over many frames, not one.
                    stop.wait(COALESCE_SECONDS)
        except OSError as error:
            if error.errno in INTERFACE_GONE:
                raise SourceError(f"{self.name}: interface went down or was removed ({error.strerror})") from None
            raise SourceError(f"{self.name}: capture socket failed: {error.strerror or error}") from None
        finally:
            self.close()

    def _read_batch(self) -> list[Frame]:
        """Read what is queued, up to BATCH_FRAMES, without blocking."""
        view = self._view
        buffers = [view]
        recvmsg_into = self._socket.recvmsg_into
        flags = socket.MSG_DONTWAIT | socket.MSG_TRUNC
        ancillary_size = socket.CMSG_SPACE(AUXDATA.size)
        link_type = self.link_type
        cooked = link_type == LINKTYPE_LINUX_SLL
        unpack_auxdata = AUXDATA.unpack_from
        loopback = self._loopback_name
        timestamp = time.time()
        batch: list[Frame] = []
        append = batch.append
        while len(batch) < BATCH_FRAMES:
            try:
                received, ancillary, _flags, address = recvmsg_into(buffers, ancillary_size, flags)
            except BlockingIOError:
                break
            if address[2] == PACKET_OUTGOING and address[0] == loopback:
                continue  # loopback frames show up twice, outgoing and incoming: keep one (as libpcap does)
            data = bytes(view[:received if received < RECEIVE_BUFFER else RECEIVE_BUFFER])
            if ancillary:
                auxdata = ancillary[0][2]
                status, wire_length, _snaplen, _mac, _net, tci, _tpid = unpack_auxdata(auxdata)
                if cooked or tci or status & TP_STATUS_VLAN_VALID:  # the uncommon case: rebuild the header
                    wire_length, data = restore_frame(link_type, data, received, auxdata, address)
            else:
                wire_length, data = restore_frame(link_type, data, received, None, address)
            append((timestamp, wire_length, link_type, data))
        return batch


def _drain(sock: socket.socket) -> None:
    for _ in range(1 << 20):  # bounded: the queue holds what arrived in a few microseconds
        try:
            sock.recv(1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return


def _loopback_name() -> Optional[str]:
    for interface in list_interfaces().values():
        if interface.hardware_type == ARPHRD_LOOPBACK:
            return interface.name
    return None


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
