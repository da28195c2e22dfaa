"""Delay and loss without netem: a client and a server namespace joined through a middle one.

``client ns: te-cli0`` <-veth-> ``te-midc`` [middle ns] ``te-mids`` <-veth-> ``te-srv0: server ns``

Client and server share one IPv4 and one IPv6 subnet, as in ``NamespacePair`` (whose methods,
addresses and neighbour entries a ``ForwardedPair`` keeps, so the live-traffic helpers work on it).
The middle namespace has no address and no IPv6 on its links: it routes nothing and sends nothing.
A Python process in it (``python -m testkit.forwarder forward``) reads every frame from each side
with an ``AF_PACKET`` socket and writes it to the other side after a fixed one-way delay, except the
frames it drops on purpose: chosen TCP payload segments by their number in a direction, or payload
segments drawn with a seeded probability. It reports what it forwarded and dropped, as JSON.

Offloads are off on every link (``ETHTOOL_STXCSUM``/``SGSO``/``SGRO`` through ``SIOCETHTOOL``, no
ethtool binary needed): with checksum offload a frame read from a veth carries only the pseudo-header
sum and would arrive corrupt once re-sent, and with TSO/GSO a "frame" can be 64 KiB. So every frame
on the wire is real-sized; the forwarder counts any longer than the link's MTU (``oversized``).

Direction names follow the exporter: ``in`` is client -> server, ``out`` server -> client.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import heapq
import ipaddress
import json
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testkit import netns
from testkit.live_traffic import wait_for_line
from testkit.netns import NamespacePair, run

MIDDLE_CLIENT_LINK = "te-midc"
MIDDLE_SERVER_LINK = "te-mids"
REPO_ROOT = Path(__file__).resolve().parents[1]

ETH_P_ALL = 0x0003
ETH_HEADER = 14
ETHERTYPE_IPV4, ETHERTYPE_IPV6 = 0x0800, 0x86DD
IPPROTO_TCP = 6
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23  # Linux 4.20
PACKET_OUTGOING = 4
SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM, ETHTOOL_SGSO, ETHTOOL_SGRO = 0x17, 0x24, 0x2C
ETHTOOL_GTXCSUM, ETHTOOL_GTSO, ETHTOOL_GGSO, ETHTOOL_GGRO = 0x16, 0x1E, 0x23, 0x2B
MAX_QUEUED_FRAMES = 20_000  # ~30 MiB of full frames: far beyond what a test's delay holds in flight
MAX_DURATION = 120.0
MAX_REPORTED_DROPS = 10_000  # beyond that, drops are only counted (dropped_unreported)


# --------------------------------------------------------------------------- frames (pure)

@dataclass(frozen=True)
class Segment:
    """The TCP header fields of a frame that the drop rules and the report need."""

    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    payload: int
    flags: int


def tcp_segment(frame: bytes) -> Segment | None:
    """The TCP segment in an untagged Ethernet frame (IPv4 unfragmented, or IPv6 without extension headers)."""
    if len(frame) < ETH_HEADER + 20:
        return None
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    ip = ETH_HEADER
    if ethertype == ETHERTYPE_IPV4:
        header = (frame[ip] & 0x0F) * 4
        total, fragment, protocol = struct.unpack_from("!H2xH1xB", frame, ip + 2)
        if protocol != IPPROTO_TCP or fragment & 0x3FFF:
            return None
        src, dst = (str(ipaddress.IPv4Address(frame[ip + off:ip + off + 4])) for off in (12, 16))
        tcp, end = ip + header, ip + total
    elif ethertype == ETHERTYPE_IPV6 and len(frame) >= ETH_HEADER + 40:
        length, next_header = struct.unpack_from("!HB", frame, ip + 4)
        if next_header != IPPROTO_TCP:
            return None
        src, dst = (str(ipaddress.IPv6Address(frame[ip + off:ip + off + 16])) for off in (8, 24))
        tcp, end = ip + 40, ip + 40 + length
    else:
        return None
    if end > len(frame) or tcp + 20 > end:
        return None
    sport, dport, seq, offset, flags = struct.unpack_from("!HHI4xBB", frame, tcp)
    payload = end - tcp - (offset >> 4) * 4
    return Segment(src, dst, sport, dport, seq, max(payload, 0), flags)


@dataclass
class DropRules:
    """Which TCP payload segments to drop, per direction: by number (1-based) or with a seeded probability."""

    nth: dict[str, frozenset[int]] = field(default_factory=lambda: {"in": frozenset(), "out": frozenset()})
    probability: float = 0.0
    probability_directions: frozenset[str] = frozenset({"out"})
    seed: int = 0

    def __post_init__(self) -> None:
        # One generator per direction, drawn once per payload segment: which segment numbers fall is
        # fixed by the seed, whatever the other direction does.
        self._random = {direction: random.Random(f"{self.seed}:{direction}") for direction in ("in", "out")}

    def drop(self, direction: str, number: int) -> bool:
        """Whether the ``number``-th payload segment seen in ``direction`` is dropped."""
        drawn = self._random[direction].random()
        if number in self.nth[direction]:
            return True
        return direction in self.probability_directions and drawn < self.probability


# --------------------------------------------------------------------------- the forwarding process

def _open(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    with contextlib.suppress(OSError):  # older kernels: the PACKET_OUTGOING check below still applies
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((interface, ETH_P_ALL))
    sock.setblocking(False)
    return sock


def _kernel_drops(sock: socket.socket) -> int:
    return struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))[1]


def _mtu(interface: str) -> int:
    return int(Path(f"/sys/class/net/{interface}/mtu").read_text())


def forward(client_side: str, server_side: str, delay: float, rules: DropRules, duration: float,
            report_path: Path) -> dict:
    """Forward frames both ways between two interfaces until SIGTERM or ``duration``; write the report."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    sockets = {"in": _open(client_side), "out": _open(server_side)}  # read side -> direction
    peer = {"in": sockets["out"], "out": sockets["in"]}
    by_fd = {sock.fileno(): direction for direction, sock in sockets.items()}
    max_frame = ETH_HEADER + max(_mtu(client_side), _mtu(server_side))
    forwarded = {"in": 0, "out": 0}
    segments = {"in": 0, "out": 0}
    report = {"delay": delay, "forwarded": forwarded, "payload_segments": segments, "dropped": [],
              "dropped_unreported": 0, "oversized": 0, "largest_frame": 0, "queue_overflow": 0,
              "send_errors": 0}
    queue: list[tuple[float, int, str, bytes]] = []
    order = 0
    start = time.monotonic()
    deadline = start + min(duration, MAX_DURATION)
    print("ready", flush=True)
    while not stop and time.monotonic() < deadline:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, direction, frame = heapq.heappop(queue)
            try:
                peer[direction].send(frame)
                forwarded[direction] += 1
            except OSError:
                report["send_errors"] += 1
        timeout = min(queue[0][0] - now if queue else 0.05, 0.05)
        readable, _, _ = select.select(list(sockets.values()), [], [], max(timeout, 0))
        for sock in readable:
            direction = by_fd[sock.fileno()]
            for _ in range(64):  # drain a burst, bounded so the other side and the queue get their turn
                try:
                    frame, address = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                if address[2] == PACKET_OUTGOING:  # our own send: never read back
                    continue
                arrived = time.monotonic()
                report["largest_frame"] = max(report["largest_frame"], len(frame))
                if len(frame) > max_frame:
                    report["oversized"] += 1
                segment = tcp_segment(frame)
                if segment is not None and segment.payload > 0:
                    segments[direction] += 1
                    if rules.drop(direction, segments[direction]):
                        if len(report["dropped"]) < MAX_REPORTED_DROPS:
                            report["dropped"].append({"direction": direction, "number": segments[direction],
                                                      "time": round(arrived - start, 6), **segment.__dict__})
                        else:
                            report["dropped_unreported"] += 1
                        continue
                if len(queue) >= MAX_QUEUED_FRAMES:
                    report["queue_overflow"] += 1
                    continue
                order += 1
                heapq.heappush(queue, (arrived + delay, order, direction, frame))
    report["left_in_queue"] = len(queue)
    report["kernel_drops"] = sum(_kernel_drops(sock) for sock in sockets.values())
    report["seconds"] = round(time.monotonic() - start, 3)
    report_path.write_text(json.dumps(report, indent=1))
    return report


# --------------------------------------------------------------------------- offloads (SIOCETHTOOL)

def _ethtool(interface: str, command: int, value: int = 0) -> int:
    """One legacy ``ethtool_value`` ioctl on ``interface`` (in the caller's namespace); returns its data."""
    buffer = ctypes.create_string_buffer(struct.pack("II", command, value), 8)
    request = struct.pack("16sP", interface.encode(), ctypes.addressof(buffer)).ljust(40, b"\0")  # struct ifreq
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, request)
    return struct.unpack("II", buffer.raw)[1]


def disable_offloads(interface: str) -> dict[str, int]:
    """Turn off checksum offload (and with it TSO), GSO and GRO; return the features read back."""
    for command in (ETHTOOL_STXCSUM, ETHTOOL_SGSO, ETHTOOL_SGRO):
        _ethtool(interface, command, 0)
    return {name: _ethtool(interface, command)
            for name, command in (("tx-checksum", ETHTOOL_GTXCSUM), ("tso", ETHTOOL_GTSO),
                                  ("gso", ETHTOOL_GGSO), ("gro", ETHTOOL_GGRO))}


# --------------------------------------------------------------------------- namespaces (test side)

def _in_namespace(namespace: str, *argv: str) -> str:
    """Run this module's command line in ``namespace``; its standard output."""
    command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "testkit.forwarder", *argv]
    result = subprocess.run(command, capture_output=True, text=True, timeout=netns.COMMAND_TIMEOUT, cwd=REPO_ROOT,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


class ForwardedPair(NamespacePair):
    """A ``NamespacePair`` whose two ends meet in a middle namespace instead of one veth pair."""

    def __init__(self) -> None:
        super().__init__()
        self.middle_ns = self.server_ns.replace("te-srv-", "te-mid-")
        self.middle_client_link, self.middle_server_link = MIDDLE_CLIENT_LINK, MIDDLE_SERVER_LINK
        self.offloads: dict[str, dict[str, int]] = {}

    def create(self) -> None:
        run(["ip", "netns", "add", self.middle_ns])
        netns._alive.add(self.middle_ns)  # removed with the others at exit, even if create fails
        for scope in ("all", "default"):  # no address, no router or neighbour solicitation, no MLD
            run(["ip", "netns", "exec", self.middle_ns, "sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1"])
        super().create()

    def add_links(self) -> None:
        """Two veth pairs, each end to the middle namespace; offloads off, the middle ends promiscuous."""
        links = ((self.client_ns, self.client_link, self.middle_client_link),
                 (self.server_ns, self.server_link, self.middle_server_link))
        for namespace, end, middle in links:
            run(["ip", "link", "add", "name", middle, "netns", self.middle_ns, "type", "veth",
                 "peer", "name", end, "netns", namespace])
            self.offloads[end] = json.loads(_in_namespace(namespace, "offloads-off", end))
            self.offloads[middle] = json.loads(_in_namespace(self.middle_ns, "offloads-off", middle))
            # Frames between the ends are addressed to the other end's MAC: accept them anyway.
            run(["ip", "-n", self.middle_ns, "link", "set", middle, "promisc", "on", "up"])

    def delete_link(self) -> None:
        run(["ip", "-n", self.server_ns, "link", "del", self.server_link])
        run(["ip", "-n", self.client_ns, "link", "del", self.client_link])

    def destroy(self) -> None:
        super().destroy()
        if self.middle_ns in netns._alive:
            netns._remove_namespace(self.middle_ns)


def forwarded_pair() -> contextlib.AbstractContextManager[ForwardedPair]:
    """Create the three namespaces; remove them (and what runs in them) on exit, even on failure."""
    return netns.namespace_pair(ForwardedPair)


class Forwarder:
    """The forwarding process in ``pair``'s middle namespace; ``stop()`` returns its report."""

    def __init__(self, pair: ForwardedPair, *, delay: float, drop_in: Sequence[int] = (),
                 drop_out: Sequence[int] = (), drop_probability: float = 0.0,
                 probability_directions: Sequence[str] = ("out",), seed: int = 0, duration: float = 60.0):
        self._directory = tempfile.TemporaryDirectory(prefix="te-forwarder-")
        self.report_path = Path(self._directory.name) / "report.json"
        argv = ["ip", "netns", "exec", pair.middle_ns, sys.executable, "-m", "testkit.forwarder", "forward",
                "--client-side", pair.middle_client_link, "--server-side", pair.middle_server_link,
                "--delay", str(delay), "--duration", str(duration), "--seed", str(seed),
                "--drop-probability", str(drop_probability),
                "--probability-directions", ",".join(probability_directions), "--report", str(self.report_path)]
        for number in drop_in:
            argv += ["--drop-in", str(number)]
        for number in drop_out:
            argv += ["--drop-out", str(number)]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        cwd=REPO_ROOT)
        self.report: dict | None = None
        try:
            wait_for_line(self.process, self.process.stdout, "ready", 20)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> dict:
        """SIGTERM, wait, and return the report (dropped segments, counts); raise if the process failed."""
        if self.report is not None:
            return self.report
        if self.process.poll() is None:
            self.process.terminate()
        try:
            _, errors = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, errors = self.process.communicate(timeout=5)
        try:
            if self.process.returncode != 0 or not self.report_path.exists():
                raise RuntimeError(f"forwarder exited with {self.process.returncode}: {errors.strip()[-2000:]}")
            self.report = json.loads(self.report_path.read_text())
        finally:
            self._directory.cleanup()
        return self.report


@contextlib.contextmanager
def forwarding(pair: ForwardedPair, **options) -> Iterator[Forwarder]:
    """Run a ``Forwarder`` (options as its constructor's) for the ``with`` block; always stop it."""
    forwarder = Forwarder(pair, **options)
    try:
        yield forwarder
    finally:
        with contextlib.suppress(RuntimeError):  # a failure inside the block matters more
            forwarder.stop()


# --------------------------------------------------------------------------- command line

def _numbers(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError("segment numbers start at 1")
    return number


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testkit.forwarder", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    off = commands.add_parser("offloads-off", help="disable checksum/TSO/GSO/GRO offloads on an interface")
    off.add_argument("interface")
    fwd = commands.add_parser("forward", help="forward frames between two interfaces with delay and drops")
    fwd.add_argument("--client-side", required=True)
    fwd.add_argument("--server-side", required=True)
    fwd.add_argument("--delay", type=float, default=0.0, help="one-way delay in seconds, each direction")
    fwd.add_argument("--drop-in", type=_numbers, action="append", default=[],
                     help="drop the N-th TCP payload segment client -> server (repeatable)")
    fwd.add_argument("--drop-out", type=_numbers, action="append", default=[],
                     help="drop the N-th TCP payload segment server -> client (repeatable)")
    fwd.add_argument("--drop-probability", type=float, default=0.0)
    fwd.add_argument("--probability-directions", default="out")
    fwd.add_argument("--seed", type=int, default=0)
    fwd.add_argument("--duration", type=float, default=60.0, help=f"stop after this long (at most {MAX_DURATION:.0f} s)")
    fwd.add_argument("--report", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "offloads-off":
        print(json.dumps(disable_offloads(args.interface)))
        return 0
    directions = frozenset(filter(None, args.probability_directions.split(",")))
    if not directions <= {"in", "out"} or not 0 <= args.drop_probability <= 1 or args.delay < 0:
        parser.error("--probability-directions takes in,out; --drop-probability 0..1; --delay >= 0")
    rules = DropRules({"in": frozenset(args.drop_in), "out": frozenset(args.drop_out)},
                      args.drop_probability, directions, args.seed)
    forward(args.client_side, args.server_side, args.delay, rules, args.duration, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
