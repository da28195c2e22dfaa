"""Write the capture that ``python -m exporter --demo`` replays: exporter/data/demo.pcap.

Two and a half minutes of a small server's traffic, built with Scapy and deterministic (seeded):
38 clients (IPv4 and IPv6) browsing over HTTP and HTTPS, an HTTPS download rush, an FTP upload, QUIC
streams, SSH sessions, DNS lookups, pings and NTP, with quiet spells in between. Frames are stored
headers only (like ``tcpdump -s 80``) while each record keeps its full length on the wire, which is
what the exporter counts, so the file stays small.

usage: python scripts/make_demo_pcap.py [OUT]      (default: exporter/data/demo.pcap)
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import RawPcapWriter

SERVER_V4 = "192.0.2.10"
SERVER_V6 = "2001:db8::10"
SERVER_MAC, ROUTER_MAC = "02:00:00:00:00:10", "02:00:00:00:00:01"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "exporter" / "data" / "demo.pcap"
SEED = 8
START = 1_735_689_600  # 2025-01-01 00:00:00 UTC; a replay only uses the offsets from the first frame
DURATION = 150.0
SNAPLEN = 80  # room for Ethernet + IPv6 + TCP headers (74 bytes)
MSS_V4, MSS_V6 = 1460, 1440  # full-size segments: 1514-byte frames

BROWSERS = ([f"198.51.100.{n}" for n in (11, 14, 23, 37, 42, 58, 64, 77, 85, 99, 120, 143)]
            + [f"203.0.113.{n}" for n in (9, 18, 27, 36, 45, 54, 63, 72)]
            + [f"2001:db8:1::{n:x}" for n in (0xa, 0x1b, 0x2c, 0x3d, 0x4e)])
DOWNLOADERS = ["198.51.100.7", "2001:db8:1::42"]
FTP_UPLOADER = "203.0.113.77"
STREAMERS = ["2001:db8:1::e1", "2001:db8:1::e2", "203.0.113.88"]
ADMINS = ["198.51.100.2", "2001:db8:1::5"]
RESOLVERS = ["198.51.100.53", "203.0.113.53", "2001:db8:1::53"]
MONITOR = "203.0.113.5"
DATABASE_CLIENT = "198.51.100.200"

# (start, end, page loads per second): bursts and quiet spells for the web traffic
WEB_PHASES = [(0, 3, 0.6), (3, 18, 1.6), (18, 40, 0.8), (40, 56, 0.1), (56, 72, 0.5), (72, 95, 1.0),
              (95, 112, 0.6), (112, 150, 0.15)]


class Timeline:
    """Frames of the capture as (time offset, frame bytes), in any order until written."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.frames: list[tuple[float, bytes]] = []
        self._built: dict[tuple, bytes] = {}  # Scapy builds are slow; bulk segments repeat

    def add(self, when: float, client: str, transport: str, server_port: int, client_port: int,
            inbound: bool, payload: int) -> None:
        """One frame between the server and ``client``; ``inbound`` means client to server."""
        if not 0 <= when < DURATION:
            return
        key = (client, transport, server_port, client_port, inbound, payload)
        if key not in self._built:
            self._built[key] = self.build(*key)
        self.frames.append((when, self._built[key]))

    @staticmethod
    def build(client: str, transport: str, server_port: int, client_port: int, inbound: bool,
              payload: int) -> bytes:
        """The whole frame, built with Scapy."""
        v6 = ":" in client
        server = SERVER_V6 if v6 else SERVER_V4
        src, dst = (client, server) if inbound else (server, client)
        sport, dport = (client_port, server_port) if inbound else (server_port, client_port)
        network = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)
        if transport == "tcp":
            layer = TCP(sport=sport, dport=dport, flags="PA" if payload else "A")
        elif transport == "udp":
            layer = UDP(sport=sport, dport=dport)
        elif v6:
            layer = ICMPv6EchoRequest() if inbound else ICMPv6EchoReply()
        else:
            layer = ICMP(type=8 if inbound else 0)
        ether = Ether(src=ROUTER_MAC, dst=SERVER_MAC) if inbound else Ether(src=SERVER_MAC, dst=ROUTER_MAC)
        return bytes(ether / network / layer / Raw(bytes(payload)))

    def port(self) -> int:
        return self.rng.randrange(32768, 61000)

    def transfer(self, start: float, client: str, server_port: int, size: int, *, inbound: bool = False,
                 frames_per_second: float = 400.0, request: int = 400) -> float:
        """A request, then ``size`` bytes of TCP payload in one direction, one ACK every two segments."""
        client_port = self.port()
        self.add(start, client, "tcp", server_port, client_port, True, request)
        mss = MSS_V6 if ":" in client else MSS_V4
        when = start + self.rng.uniform(0.01, 0.05)
        index = 0
        while size > 0:
            self.add(when, client, "tcp", server_port, client_port, inbound, min(size, mss))
            if index % 2:
                self.add(when + 0.0005, client, "tcp", server_port, client_port, not inbound, 0)
            size -= mss
            index += 1
            when += self.rng.expovariate(frames_per_second)
        return when

    def exchange(self, when: float, client: str, transport: str, server_port: int, request: int,
                 reply: int) -> None:
        """One request and its reply, a few milliseconds apart."""
        client_port = self.port() if server_port else 0
        self.add(when, client, transport, server_port, client_port, True, request)
        self.add(when + self.rng.uniform(0.001, 0.02), client, transport, server_port, client_port, False, reply)


def web(timeline: Timeline) -> None:
    """Page loads: HTML, then a few assets, over HTTP (80, 8080) and HTTPS."""
    rng = timeline.rng
    for start, end, rate in WEB_PHASES:
        when = start + rng.expovariate(rate)
        while when < end:
            client = rng.choice(BROWSERS)
            port = rng.choices([443, 80, 8080], weights=[6, 3, 1])[0]
            for _ in range(rng.randint(1, 4)):
                timeline.transfer(when, client, port, int(rng.lognormvariate(9.0, 1.0)))
                when += rng.uniform(0.05, 0.4)
            when += rng.expovariate(rate)


def bursts(timeline: Timeline) -> None:
    """The big movers: an HTTPS download rush, an FTP upload and QUIC video streams."""
    rng = timeline.rng
    for client, size, fps in zip(DOWNLOADERS, (1_200_000, 800_000), (80, 55)):
        when = 4.0 + rng.uniform(0, 1)
        while size > 0 and when < 17.5:
            chunk = min(size, 300_000)
            when = timeline.transfer(when, client, 443, chunk, frames_per_second=fps) + rng.uniform(0.1, 0.5)
            size -= chunk
    ftp_session(timeline, 58.0)
    for index, client in enumerate(STREAMERS):
        client_port = timeline.port()
        when = 96.0 + index * 1.5
        while when < 110.0:
            timeline.add(when, client, "udp", 443, client_port, False, 1200)
            if rng.random() < 0.25:
                timeline.add(when + 0.002, client, "udp", 443, client_port, True, 40)
            when += rng.expovariate(28)


def ftp_session(timeline: Timeline, start: float) -> None:
    """Commands on tcp/21, then an upload (client to server) on the data connection, tcp/20."""
    when = start
    for command, reply in ((16, 60), (14, 40), (14, 36), (28, 50)):  # USER, PASS, TYPE I, STOR
        timeline.exchange(when, FTP_UPLOADER, "tcp", 21, command, reply)
        when += timeline.rng.uniform(0.2, 0.6)
    when = timeline.transfer(when, FTP_UPLOADER, 20, 700_000, inbound=True, frames_per_second=50)
    timeline.exchange(when + 0.05, FTP_UPLOADER, "tcp", 21, 6, 24)  # QUIT after 226 Transfer complete


def background(timeline: Timeline) -> None:
    """What never stops: DNS lookups, SSH sessions, pings, NTP and a database client."""
    rng = timeline.rng
    when = 0.0
    while when < DURATION:
        timeline.exchange(when, rng.choice(RESOLVERS), "udp", 53, rng.randint(28, 48), rng.randint(60, 260))
        when += rng.expovariate(1.0)
    for client, (start, end) in zip(ADMINS, ((2, 64), (70, 140))):
        client_port = timeline.port()
        when = float(start)
        while when < end:
            timeline.add(when, client, "tcp", 22, client_port, True, 36)  # one keystroke
            timeline.add(when + 0.03, client, "tcp", 22, client_port, False, rng.choice((36, 36, 52, 420, 1100)))
            when += rng.expovariate(1.5)
    for second in range(int(DURATION)):
        if second % 2 == 0:
            timeline.exchange(second + 0.5, MONITOR, "icmp", 0, 56, 56)
        if second % 5 == 0:
            timeline.exchange(second + 0.7, ADMINS[1], "icmp", 0, 56, 56)
        if second % 6 == 3:  # every browser keeps its clock in sync, so each one shows up
            timeline.exchange(second + 0.2, BROWSERS[second // 6], "udp", 123, 48, 48)
    when = 20.0
    while when < 130.0:
        timeline.exchange(when, DATABASE_CLIENT, "tcp", 5432, rng.randint(60, 300), rng.randint(100, 3000))
        when += rng.expovariate(1.5)


def write(timeline: Timeline, path: Path) -> int:
    """Write the frames in time order, headers only; return how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = sorted(timeline.frames, key=lambda item: item[0])
    with RawPcapWriter(str(path), linktype=1, snaplen=SNAPLEN) as writer:
        writer.write_header(None)
        for when, data in frames:
            micros = round(when * 1_000_000)
            writer.write_packet(data[:SNAPLEN], sec=START + micros // 1_000_000, usec=micros % 1_000_000,
                                wirelen=len(data))
    return len(frames)


def make_demo_pcap(path: Path = DEFAULT_OUT, seed: int = SEED) -> int:
    """Build the demo capture at ``path``; the same seed gives the same bytes. Returns the frame count."""
    timeline = Timeline(seed)
    background(timeline)
    web(timeline)
    bursts(timeline)
    timeline.add(DURATION - 0.01, MONITOR, "icmp", 0, 0, True, 56)  # fixes the loop length
    return write(timeline, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    frames = make_demo_pcap(args.out)
    print(f"wrote {args.out}: {frames} frames, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
