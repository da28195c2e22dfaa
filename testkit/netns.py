"""Two network namespaces joined by a veth pair, for live-capture tests; always removed afterwards.

Traffic stays between the addresses assigned here: the namespaces have no other interface than
``lo`` and the veth, and no route out. Neighbour entries are static, so no ARP or neighbour
discovery between the two addresses adds frames a test did not ask for.
"""
from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator, Sequence

SERVER_LINK = "te-srv0"
CLIENT_LINK = "te-cli0"
COMMAND_TIMEOUT = 20
_counter = itertools.count(1)
_alive: set[str] = set()


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (not root, no ``ip netns``), or None."""
    if os.geteuid() != 0:
        return "live-capture tests need root (network namespaces, packet sockets)"
    if shutil.which("ip") is None:
        return "iproute2's ip command is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if probe.returncode != 0:
        return f"ip netns is unavailable: {probe.stderr.strip()}"
    return None


def run(argv: Sequence[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a command, bounded in time; on failure the error shows its stderr."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _remove_namespace(name: str) -> None:
    """Kill what still runs inside (only processes started in this test's own namespace), then delete it."""
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), sig)
        deadline = time.monotonic() + 3
        while pids and time.monotonic() < deadline:
            pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
            if pids:
                time.sleep(0.05)
        if not pids:
            break
    run(["ip", "netns", "del", name], check=False)
    _alive.discard(name)


@atexit.register
def _remove_leftovers() -> None:
    for name in list(_alive):
        _remove_namespace(name)


class NamespacePair:
    """A server and a client namespace, ``SERVER_LINK`` <-> ``CLIENT_LINK``, IPv4 and IPv6 on both ends."""

    def __init__(self) -> None:
        number = next(_counter)
        self.subnet = (os.getpid() + number) % 250 + 1
        self.server_ns = f"te-srv-{os.getpid()}-{number}"
        self.client_ns = f"te-cli-{os.getpid()}-{number}"
        self.server_link, self.client_link = SERVER_LINK, CLIENT_LINK
        self.server_v4, self.client_v4 = f"10.199.{self.subnet}.1", f"10.199.{self.subnet}.2"
        self.server_v6, self.client_v6 = f"fd00:199:{self.subnet:x}::1", f"fd00:199:{self.subnet:x}::2"
        self.server_mac = self.client_mac = ""

    # -- commands inside a namespace
    def server(self, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.server_ns, *argv], check=check, timeout=timeout)

    def client(self, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.client_ns, *argv], check=check, timeout=timeout)

    def server_command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.server_ns, *argv]

    def client_command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.client_ns, *argv]

    # -- life cycle
    def create(self) -> None:
        for name in (self.server_ns, self.client_ns):
            run(["ip", "netns", "add", name])
            _alive.add(name)
            run(["ip", "-n", name, "link", "set", "lo", "up"])
            # Nothing may solicit routers or probe duplicates: keeps the link quiet between tests' frames.
            for setting in ("accept_ra=0", "router_solicitations=0", "dad_transmits=0"):
                for scope in ("all", "default"):
                    run(["ip", "netns", "exec", name, "sysctl", "-qw", f"net.ipv6.conf.{scope}.{setting}"])
        self.create_link()

    def create_link(self) -> None:
        """Create (or re-create, after ``delete_link``) the veth pair with the same names and addresses."""
        self.add_links()
        self.address_ends()

    def add_links(self) -> None:
        """The link between the two ends: one veth pair."""
        run(["ip", "link", "add", "name", self.server_link, "netns", self.server_ns, "type", "veth",
             "peer", "name", self.client_link, "netns", self.client_ns])

    def address_ends(self) -> None:
        """Addresses on both ends, each end's neighbour entry for the other, and carrier up."""
        ends = ((self.server_ns, self.server_link, self.server_v4, self.server_v6),
                (self.client_ns, self.client_link, self.client_v4, self.client_v6))
        for namespace, link, v4, v6 in ends:
            run(["ip", "-n", namespace, "addr", "add", f"{v4}/24", "dev", link])
            run(["ip", "-n", namespace, "addr", "add", f"{v6}/64", "dev", link, "nodad"])
            run(["ip", "-n", namespace, "link", "set", link, "up"])
        self.server_mac = self._mac(self.server_ns, self.server_link)
        self.client_mac = self._mac(self.client_ns, self.client_link)
        for namespace, link, peer_v4, peer_v6, peer_mac in (
                (self.server_ns, self.server_link, self.client_v4, self.client_v6, self.client_mac),
                (self.client_ns, self.client_link, self.server_v4, self.server_v6, self.server_mac)):
            for address in (peer_v4, peer_v6):
                run(["ip", "-n", namespace, "neigh", "replace", address, "lladdr", peer_mac, "dev", link,
                     "nud", "permanent"])
        self._wait_carrier()

    def delete_link(self) -> None:
        """Delete the veth pair (both ends go)."""
        run(["ip", "-n", self.server_ns, "link", "del", self.server_link])

    def destroy(self) -> None:
        for name in (self.client_ns, self.server_ns):
            if name in _alive:
                _remove_namespace(name)

    def _mac(self, namespace: str, link: str) -> str:
        return json.loads(run(["ip", "-n", namespace, "-j", "link", "show", "dev", link]).stdout)[0]["address"]

    def _wait_carrier(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [json.loads(run(["ip", "-n", ns, "-j", "link", "show", "dev", link]).stdout)[0]["operstate"]
                      for ns, link in ((self.server_ns, self.server_link), (self.client_ns, self.client_link))]
            if states == ["UP", "UP"]:
                return
            time.sleep(0.05)
        raise RuntimeError(f"veth pair did not come up within {timeout} s")


@contextlib.contextmanager
def namespace_pair(kind: type[NamespacePair] = NamespacePair) -> Iterator[NamespacePair]:
    """Create a namespace pair (of ``kind``); remove its namespaces (and what runs in them) on exit, even on failure."""
    pair = kind()
    try:
        pair.create()
        yield pair
    finally:
        pair.destroy()


@contextlib.contextmanager
def namespace_hosts(namespace: str, hosts: str) -> Iterator[None]:
    """``hosts`` as the namespace's /etc/hosts, and a resolver at 127.0.0.1 (so no query leaves it), while held.

    ``ip netns exec`` binds /etc/netns/NAME/hosts and resolv.conf over /etc's; both are removed on exit
    (and /etc/netns itself if it was made here).
    """
    parent = Path("/etc/netns")
    made_parent = not parent.exists()
    directory = parent / namespace
    directory.mkdir(parents=True)
    try:
        (directory / "hosts").write_text(hosts)
        (directory / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if made_parent:
            shutil.rmtree(parent, ignore_errors=True)
