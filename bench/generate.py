"""Write deterministic synthetic pcaps for the benchmark.

Friendly traffic (the default): many clients, every protocol label, IPv4 and IPv6, VLAN tags, frames
not for the server and frames without IP, drawn from a few thousand distinct frames.
Worst-case traffic (``--worst-case``): every frame a new flow, and many of the rare header shapes.

usage: python -m bench.generate OUT.pcap [--frames N] [--worst-case]
"""
from __future__ import annotations

import argparse
import ipaddress
import random
import struct
import sys
from typing import Iterable, Iterator

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

SERVER_V4 = "10.99.0.1"
SERVER_V6 = "fd00:99::1"
SERVICES = [("tcp", 80), ("tcp", 8080), ("tcp", 443), ("udp", 443), ("tcp", 21), ("tcp", 22), ("udp", 53),
            ("tcp", 53), ("tcp", 5432), ("icmp", 0)]
TEMPLATES = 4096  # distinct frames; the file repeats them with fresh timestamps
FRAMES = 500_000
CLIENTS = 2000
WORST_CASE_FRAMES = 600_000

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_8021Q = 0x8100
ETHERTYPE_8021AD = 0x88A8
ETHERTYPE_IPV6 = 0x86DD
IPPROTO_HOPOPTS = 0
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_FRAGMENT = 44
IPPROTO_ICMPV6 = 58
ETHERNET_MIN_FRAME = 60  # without the FCS: shorter frames are padded, as on the wire
# Every frame must fit a 1500-byte MTU with all its headers (tcpreplay cannot send it otherwise).
MAX_PAYLOAD = 1400

# The worst-case mix. Shares of all frames:
ARP_SHARE = 0.02
OTHER_HOSTS_SHARE = 0.03  # IP traffic between a client and another host, not the server
# Shares of the IP frames:
IPV6_CLIENT_SHARE = 0.3  # of the clients, hence of the IP frames
FRAGMENT_SHARE = 0.03  # in either family; half of them first fragments (with ports)
# Shares of one family's frames:
VLAN_SHARE_V4 = 1 / 3  # IPv4 frames with 802.1Q tags; half of them QinQ (802.1ad outer tag)
OPTIONS_SHARE_V4 = 0.05  # an IPv4 header with a Router Alert option
HOP_BY_HOP_SHARE_V6 = 0.1  # not counting fragments, which carry a fragment header instead
WORST_CASE_SERVICES = [("tcp", 80), ("tcp", 8080), ("tcp", 443), ("tcp", 21), ("tcp", 22), ("tcp", 53),
                       ("udp", 53), ("udp", 443), ("tcp", 5432), ("udp", 123), ("tcp", 3389), ("icmp", 0)]
WORST_CASE_MIX = (f"every frame a new flow (a fresh client port); {CLIENTS:,} clients, "
                  f"{1 - IPV6_CLIENT_SHARE:.0%} IPv4, {IPV6_CLIENT_SHARE:.0%} IPv6; {VLAN_SHARE_V4:.0%} of the IPv4 "
                  f"frames VLAN-tagged (half of them QinQ), {OPTIONS_SHARE_V4:.0%} with IP options; "
                  f"{HOP_BY_HOP_SHARE_V6:.0%} of the IPv6 frames with a hop-by-hop header; {FRAGMENT_SHARE:.0%} "
                  f"fragments; {ARP_SHARE:.0%} ARP; {OTHER_HOSTS_SHARE:.0%} between other hosts; every protocol "
                  "label, both directions")
EPHEMERAL_PORTS = (1024, 65535)
SERVER_MAC = bytes.fromhex("020000000001")
BROADCAST_MAC = b"\xff" * 6
OTHER_HOSTS_V4 = "10.98.0.0"  # the other hosts: this network's first 256 addresses
OTHER_HOSTS_V6 = "fd00:98::"

_IPV4 = struct.Struct("!BBHHHBBH4s4s").pack  # version+IHL, TOS, length, id, flags+offset, TTL, proto, csum
_IPV6 = struct.Struct("!IHBB16s16s").pack  # version+class+flow, payload length, next header, hop limit
_TCP = struct.Struct("!HHIIBBHHH").pack
_UDP = struct.Struct("!HHHH").pack
_ICMP_ECHO = struct.Struct("!BBHHH").pack  # type, code, checksum, identifier, sequence
_FRAGMENT_V6 = struct.Struct("!BBHI").pack
_TAG = struct.Struct("!HH").pack  # TPID, TCI
_ETHERTYPE = struct.Struct("!H").pack
_ARP = struct.Struct("!HHBBH6s4s6s4s").pack
_PCAP_HEADER = struct.Struct("<IHHiIII").pack
_RECORD_HEADER = struct.Struct("<IIII").pack
_ROUTER_ALERT_V4 = b"\x94\x04\x00\x00"  # RFC 2113
_HOP_BY_HOP_PADDING = b"\x01\x04\x00\x00\x00\x00"  # a PadN option filling the 8-byte header
_ZEROS = bytes(1500)


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


def friendly_frames(frames: int, clients: int = CLIENTS, seed: int = 1) -> Iterator[bytes]:
    """``frames`` frames drawn from ``TEMPLATES`` distinct ones, deterministic for a given seed."""
    rng = random.Random(seed)
    templates = [build_frame(rng, clients) for _ in range(TEMPLATES)]
    for _ in range(frames):
        yield templates[rng.randrange(TEMPLATES)]


def client_address(index: int, clients: int) -> str:
    """The address of worst-case client ``index``: the first 70% are IPv4, the rest IPv6."""
    if index < _ipv4_clients(clients):
        return f"10.99.{index // 250 + 1}.{index % 250 + 1}"
    return f"fd00:99::{index + 2:x}"


def worst_case_frames(frames: int, clients: int = CLIENTS, seed: int = 1) -> Iterator[bytes]:
    """``frames`` frames in which every flow is new: the worst case for counting per flow.

    Each frame takes a fresh ephemeral port of one of ``clients`` clients (70% IPv4, 30% IPv6)
    and goes to or from the server in either direction, under every protocol label; a few are
    ARP or traffic between a client and other hosts. IPv4 frames carry VLAN tags (one 802.1Q or
    802.1ad + 802.1Q) and Router Alert options, IPv6 frames hop-by-hop headers, both families
    fragments (the shares are the ``*_SHARE`` constants). Built with struct, not Scapy, for speed;
    payloads are zeros and checksums are left zero (nothing between tcpreplay and a packet socket
    verifies them). Deterministic for a given seed.
    """
    rng = random.Random(seed)
    ipv4_clients = _ipv4_clients(clients)
    addresses = [ipaddress.ip_address(client_address(index, clients)).packed for index in range(clients)]
    macs = [b"\x02\x01" + index.to_bytes(4, "big") for index in range(clients)]
    # Each client walks its own port range from a different start, so no port repeats within a client.
    low, high = EPHEMERAL_PORTS
    next_port = [low + index * 7919 % (high - low + 1) for index in range(clients)]
    servers = {False: ipaddress.ip_address(SERVER_V4).packed, True: ipaddress.ip_address(SERVER_V6).packed}
    other_hosts = {False: ipaddress.ip_address(OTHER_HOSTS_V4).packed,
                   True: ipaddress.ip_address(OTHER_HOSTS_V6).packed}
    for sequence in range(frames):
        roll = rng.random()
        client = rng.randrange(clients)
        if roll < ARP_SHARE:
            yield _arp(addresses[client % ipv4_clients], macs[client % ipv4_clients], servers[False],
                       reply=rng.random() < 0.5)
            continue
        port = next_port[client]
        next_port[client] = port + 1 if port < high else low
        v6 = client >= ipv4_clients
        peer = servers[v6]
        if roll < ARP_SHARE + OTHER_HOSTS_SHARE:
            peer = other_hosts[v6][:-1] + bytes((rng.randrange(1, 256),))
        inbound = rng.random() < 0.5
        ip_proto, transport, payload = _transport(rng, v6, inbound, port, sequence)
        if inbound:
            mac_pair, src, dst = SERVER_MAC + macs[client], addresses[client], peer  # destination MAC first
        else:
            mac_pair, src, dst = macs[client] + SERVER_MAC, peer, addresses[client]
        network = _ipv6 if v6 else _ipv4
        frame = mac_pair + network(rng, ip_proto, transport, payload, src, dst, sequence)
        if len(frame) < ETHERNET_MIN_FRAME:
            frame += _ZEROS[:ETHERNET_MIN_FRAME - len(frame)]
        yield frame


def _transport(rng: random.Random, v6: bool, inbound: bool, port: int, sequence: int) -> tuple[int, bytes, int]:
    """(IP protocol, transport header, payload length) of a frame to or from one of the services."""
    kind, service = rng.choice(WORST_CASE_SERVICES)
    sport, dport = (port, service) if inbound else (service, port)
    if kind == "tcp":
        flags = 0x18 if rng.random() < 0.6 else 0x10  # PSH+ACK with data, or a bare ACK
        header = _TCP(sport, dport, rng.getrandbits(32), rng.getrandbits(32), 0x50, flags, 65535, 0, 0)
        return IPPROTO_TCP, header, rng.randrange(1, MAX_PAYLOAD + 1) if flags == 0x18 else 0
    if kind == "udp":
        payload = rng.randrange(8, 513)
        return IPPROTO_UDP, _UDP(sport, dport, 8 + payload, 0), payload
    # Echo request in, reply out; the identifier is the "port" that makes the flow new.
    if v6:
        return IPPROTO_ICMPV6, _ICMP_ECHO(128 if inbound else 129, 0, 0, port, sequence & 0xFFFF), 56
    return IPPROTO_ICMP, _ICMP_ECHO(8 if inbound else 0, 0, 0, port, sequence & 0xFFFF), 56


def _fragment(rng: random.Random, transport: bytes, payload: int) -> tuple[bool, bool, bytes]:
    """(is a fragment, is a later fragment, the IP payload): a later fragment has no transport header."""
    if rng.random() >= FRAGMENT_SHARE:
        return False, False, transport + _ZEROS[:payload]
    if rng.random() < 0.5:
        return True, False, transport + _ZEROS[:payload]
    return True, True, _ZEROS[:rng.randrange(8, MAX_PAYLOAD + 1)]


def _ipv4(rng: random.Random, ip_proto: int, transport: bytes, payload: int, src: bytes, dst: bytes,
          sequence: int) -> bytes:
    """VLAN tags (a third), ethertype and IPv4 header (5% with options), then the IP payload."""
    fragment, later, body = _fragment(rng, transport, payload)
    flags_offset = 0
    if fragment:  # more fragments follow; a later one starts some 8-byte blocks in
        flags_offset = 0x2000 | (rng.randrange(1, 185) if later else 0)
    options = _ROUTER_ALERT_V4 if rng.random() < OPTIONS_SHARE_V4 else b""
    header = _IPV4(0x45 + len(options) // 4, 0, 20 + len(options) + len(body), sequence & 0xFFFF, flags_offset,
                   64, ip_proto, 0, src, dst)
    tags = b""
    if rng.random() < VLAN_SHARE_V4:
        tags = _TAG(ETHERTYPE_8021Q, rng.randrange(1, 4095))
        if rng.random() < 0.5:
            tags = _TAG(ETHERTYPE_8021AD, rng.randrange(1, 4095)) + tags
    return tags + _ETHERTYPE(ETHERTYPE_IPV4) + header + options + body


def _ipv6(rng: random.Random, ip_proto: int, transport: bytes, payload: int, src: bytes, dst: bytes,
          sequence: int) -> bytes:
    """Ethertype and IPv6 header, a fragment header or (a tenth of the rest) a hop-by-hop header, the payload."""
    fragment, later, body = _fragment(rng, transport, payload)
    extension = b""
    if fragment:
        offset = rng.randrange(1, 185) << 3 if later else 0
        extension, ip_proto = _FRAGMENT_V6(ip_proto, 0, offset | 1, sequence), IPPROTO_FRAGMENT
    elif rng.random() < HOP_BY_HOP_SHARE_V6:
        extension, ip_proto = bytes((ip_proto, 0)) + _HOP_BY_HOP_PADDING, IPPROTO_HOPOPTS
    header = _IPV6(0x60000000, len(extension) + len(body), ip_proto, 64, src, dst)
    return _ETHERTYPE(ETHERTYPE_IPV6) + header + extension + body


def _ipv4_clients(clients: int) -> int:
    return max(1, round(clients * (1 - IPV6_CLIENT_SHARE)))


def _arp(client_ip: bytes, client_mac: bytes, server_ip: bytes, reply: bool) -> bytes:
    """A client asking for the server's address (broadcast), or the server's answer."""
    if reply:
        header = client_mac + SERVER_MAC
        arp = _ARP(1, ETHERTYPE_IPV4, 6, 4, 2, SERVER_MAC, server_ip, client_mac, client_ip)
    else:
        header = BROADCAST_MAC + client_mac
        arp = _ARP(1, ETHERTYPE_IPV4, 6, 4, 1, client_mac, client_ip, bytes(6), server_ip)
    frame = header + _ETHERTYPE(ETHERTYPE_ARP) + arp
    return frame + _ZEROS[:ETHERNET_MIN_FRAME - len(frame)]


def write_frames(path: str, frames: Iterable[bytes], frames_per_second: int = 100_000) -> int:
    """Write ``frames`` as an Ethernet pcap, stamped ``frames_per_second`` apart; returns how many."""
    count = 0
    with open(path, "wb") as out:
        out.write(_PCAP_HEADER(0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        for count, frame in enumerate(frames, 1):
            seconds, micros = divmod((count - 1) * 1_000_000 // frames_per_second, 1_000_000)
            out.write(_RECORD_HEADER(1_700_000_000 + seconds, micros, len(frame), len(frame)) + frame)
    return count


def write_pcap(path: str, frames: int, clients: int = CLIENTS, seed: int = 1,
               frames_per_second: int = 100_000) -> None:
    """Write ``frames`` friendly frames stamped ``frames_per_second`` apart, deterministic for a given seed."""
    write_frames(path, friendly_frames(frames, clients, seed), frames_per_second)


def write_worst_case_pcap(path: str, frames: int, clients: int = CLIENTS, seed: int = 1,
                          frames_per_second: int = 100_000) -> None:
    """Write ``frames`` worst-case frames (see ``worst_case_frames``) stamped ``frames_per_second`` apart."""
    write_frames(path, worst_case_frames(frames, clients, seed), frames_per_second)


def _frame_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 frame, got {count}")
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--frames", type=_frame_count,
                        help=f"frames to write (default {FRAMES:,}, or {WORST_CASE_FRAMES:,} with --worst-case)")
    parser.add_argument("--worst-case", action="store_true", help="every frame a new flow, many rare header shapes")
    args = parser.parse_args()
    write = write_worst_case_pcap if args.worst_case else write_pcap
    try:
        write(args.out, args.frames or (WORST_CASE_FRAMES if args.worst_case else FRAMES))
    except OSError as error:
        sys.exit(f"bench.generate: cannot write {args.out}: {error.strerror}")


if __name__ == "__main__":
    main()
