"""Write a deterministic synthetic pcap for the benchmark: many clients, every protocol label,
IPv4 and IPv6, VLAN tags, frames not for the server and frames without IP.

usage: python -m bench.generate OUT.pcap [--frames N]
"""
from __future__ import annotations

import argparse
import random
import struct

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

SERVER_V4 = "10.99.0.1"
SERVER_V6 = "fd00:99::1"
SERVICES = [("tcp", 80), ("tcp", 8080), ("tcp", 443), ("udp", 443), ("tcp", 21), ("tcp", 22), ("udp", 53),
            ("tcp", 53), ("tcp", 5432), ("icmp", 0)]
TEMPLATES = 4096  # distinct frames; the file repeats them with fresh timestamps


def build_frame(rng: random.Random, clients: int) -> bytes:
    """One random frame; about 90% to or from the server, the rest other hosts or ARP."""
    roll = rng.random()
    ether = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    if roll < 0.03:
        return bytes(ether / ARP(psrc="10.99.0.7", pdst=SERVER_V4))
    v6 = rng.random() < 0.3
    client = rng.randrange(clients)
    if v6:
        client_ip, server_ip = f"fd00:99::{client + 2:x}", SERVER_V6
    else:
        client_ip, server_ip = f"10.99.{client // 250 + 1}.{client % 250 + 1}", SERVER_V4
    if roll < 0.08:
        server_ip = "fd00:98::1" if v6 else "10.98.0.1"  # not the server
    kind, port = rng.choice(SERVICES)
    inbound = rng.random() < 0.5
    src, dst = (client_ip, server_ip) if inbound else (server_ip, client_ip)
    ephemeral = rng.randrange(32768, 61000)
    sport, dport = (ephemeral, port) if inbound else (port, ephemeral)
    payload = Raw(bytes(rng.randrange(0, 1400 if kind == "tcp" else 500)))
    if kind == "tcp":
        transport = TCP(sport=sport, dport=dport, flags="PA") / payload
    elif kind == "udp":
        transport = UDP(sport=sport, dport=dport) / payload
    else:
        transport = ICMP() / payload
    network = (IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)) / transport
    if rng.random() < 0.1:
        return bytes(ether / Dot1Q(vlan=rng.randrange(1, 4095)) / network)
    return bytes(ether / network)


def write_pcap(path: str, frames: int, clients: int = 2000, seed: int = 1,
               frames_per_second: int = 100_000) -> None:
    """Write ``frames`` frames stamped ``frames_per_second`` apart, deterministic for a given seed."""
    rng = random.Random(seed)
    templates = [build_frame(rng, clients) for _ in range(TEMPLATES)]
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        for index in range(frames):
            frame = templates[rng.randrange(TEMPLATES)]
            seconds, micros = divmod(index * 1_000_000 // frames_per_second, 1_000_000)
            out.write(struct.pack("<IIII", 1_700_000_000 + seconds, micros, len(frame), len(frame)))
            out.write(frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--frames", type=int, default=500_000)
    args = parser.parse_args()
    write_pcap(args.out, args.frames)


if __name__ == "__main__":
    main()
