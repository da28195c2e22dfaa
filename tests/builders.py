"""Constants and small builders shared by the tests (pytest discourages importing conftest)."""
from __future__ import annotations

import ipaddress
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Optional

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_RR, IPOption_Timestamp
from scapy.layers.inet6 import (ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                                IPv6ExtHdrRouting)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from exporter.classify import DEFAULT_PORT_LABELS, DIRECTIONS, protocol_labels
from exporter.clients import BatchCounts, ClientGrouping, counts_from_mapping
from exporter.decode import (LINKTYPE_ETHERNET, LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2,
                             LINKTYPE_NULL, LINKTYPE_RAW, LINKTYPE_RAW_12, LINKTYPE_RAW_14)
from exporter.frames import FrameBatch

LABELS = protocol_labels(DEFAULT_PORT_LABELS)


class ManualClock:
    """A monotonic clock the test moves by hand (``clock.now += seconds``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Frame(NamedTuple):
    """One frame, copied: its length on the wire and its captured bytes."""

    wire_length: int
    data: bytes


def batch_of(link_type: int, frames: Iterable[Frame]) -> FrameBatch:
    """A batch holding copies of ``frames``, one after the other in one buffer."""
    pieces, spans, position = [], [], 0
    for wire_length, data in frames:
        pieces.append(data)
        spans.append((position, position + len(data), wire_length))
        position += len(data)
    return FrameBatch.from_spans(link_type, b"".join(pieces), spans)

# tcpdump's test captures, and what an independent oracle counted in each (tests/data/README.md)
CORPUS = Path(__file__).absolute().parent / "data" / "corpus"
CORPUS_PCAPS = CORPUS / "pcaps"
AFS_PCAP = CORPUS_PCAPS / "afs.pcap"  # 601 Ethernet frames: 4 clients of one server, 12 frames of other hosts
AFS_SERVER = "131.151.32.21"

MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}  # given: Scapy would look them up on the network
LINKTYPE_USER0 = 147  # reserved for private use: a link type the exporter does not decode


def expected_summary(capture_name: str) -> dict:
    """The oracle's accounting of the corpus capture ``capture_name``."""
    return json.loads((CORPUS / "expected" / f"{capture_name}.json").read_text())


def summarize(*args) -> subprocess.CompletedProcess:
    """Run ``python -m exporter summarize`` with ``args``."""
    return subprocess.run([sys.executable, "-m", "exporter", "summarize", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def frame_of(packet) -> Frame:
    """A captured frame, whole on the wire, from a Scapy packet."""
    data = bytes(packet)
    return Frame(len(data), data)


def batch_counts(entries: Mapping[tuple, tuple[int, int]], ignored: Optional[dict] = None,
                 grouping: Optional[ClientGrouping] = None) -> BatchCounts:
    """The engine's sums of a batch from ``{(address, direction, label): (bytes, packets)}``.

    Addresses may be text or packed bytes.
    """
    packed = {}
    for (address, direction, label), (nbytes, packets) in entries.items():
        if isinstance(address, str):
            address = ipaddress.ip_address(address).packed
        total = packed.setdefault((address, direction, label), [0, 0])
        total[0] += nbytes
        total[1] += packets
    return counts_from_mapping(packed, LABELS, grouping)._replace(ignored=dict(ignored or {}))


def frames_of(batch) -> list:
    """The frames of a batch, copied out of its buffer."""
    return [Frame(wire, bytes(batch.buffer[start:end]))
            for start, end, wire in zip(batch.starts.tolist(), batch.ends.tolist(), batch.wire_lengths.tolist())]


def spans_of(batch) -> list[tuple[int, int, int]]:
    """(start, end, wire_length) of each frame of a batch."""
    return list(zip(batch.starts.tolist(), batch.ends.tolist(), batch.wire_lengths.tolist()))


def count_frames(frames, servers, link_type: int = LINKTYPE_ETHERNET,
                 grouping: Optional[ClientGrouping] = None) -> BatchCounts:
    """What the counting engine sums of ``frames`` (``Frame``s of ``link_type``) for ``servers``."""
    from exporter.engine import FrameCounter
    counter = FrameCounter(servers, DEFAULT_PORT_LABELS, LABELS, grouping)
    return counter.count(batch_of(link_type, frames))


def sums_of(counts: BatchCounts, grouping: Optional[ClientGrouping] = None) -> dict:
    """``{(client label, direction, protocol): [bytes, packets]}`` of the engine's sums (rows added up)."""
    grouping = grouping or ClientGrouping()
    sums: dict = {}
    for key, cells in zip(zip(counts.family.tolist(), counts.hi.tolist(), counts.lo.tolist()), counts.counts):
        for direction, label in zip(*cells[1].nonzero()):
            total = sums.setdefault((grouping.name(key), DIRECTIONS[direction], LABELS[label]), [0, 0])
            total[0] += int(cells[0, direction, label])
            total[1] += int(cells[1, direction, label])
    return sums


def timestamps_of(batch) -> list:
    """The batch's timestamps, None where a frame was recorded without one."""
    return [None if stamp != stamp else stamp for stamp in batch.timestamps.tolist()]  # NaN != NaN


# Random frames of every link type and shape the decoders know, built with Scapy.
def random_address(rng: random.Random, version: int) -> str:
    bits = 32 if version == 4 else 128
    value = rng.getrandbits(bits)
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))


def random_transport(rng: random.Random, version: int):
    kind = rng.choice(["tcp", "udp", "icmp", "other"])
    sport, dport = rng.randrange(65536), rng.choice([20, 21, 22, 53, 80, 443, 8080, rng.randrange(65536)])
    payload = Raw(bytes(rng.randrange(256) for _ in range(rng.randrange(40))))
    if kind == "tcp":
        return TCP(sport=sport, dport=dport) / payload
    if kind == "udp":
        return UDP(sport=sport, dport=dport) / payload
    if kind == "icmp":
        return (ICMP() if version == 4 else ICMPv6EchoRequest()) / payload
    return payload


def random_network(rng: random.Random):
    version = rng.choice([4, 6])
    src, dst = random_address(rng, version), random_address(rng, version)
    transport = random_transport(rng, version)
    if version == 4:
        options = rng.choice([[], [IPOption_NOP()] * 4, [IPOption_RR()], [IPOption_Timestamp(flg=0)]])
        frag = rng.choice([0, 0, 0, rng.randrange(1, 8192)])
        ip = IP(src=src, dst=dst, options=options, frag=frag, flags=rng.choice([0, 1, 2]))
        if not transport.haslayer(TCP) and not transport.haslayer(UDP) and not transport.haslayer(ICMP):
            ip.proto = rng.choice([47, 50, 132])
        return ip / transport
    ip = IPv6(src=src, dst=dst)
    chain = rng.sample([IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting, IPv6ExtHdrFragment, AH],
                       rng.randrange(4))
    packet = ip
    for layer in chain:
        if layer is IPv6ExtHdrFragment:
            header = IPv6ExtHdrFragment(offset=rng.choice([0, 0, rng.randrange(1, 8192)]), m=rng.randrange(2))
        elif layer is AH:
            icv = rng.choice([4, 12])
            header = AH(spi=rng.randrange(1, 2**32), icv=bytes(icv), payloadlen=(12 + icv) // 4 - 2)
        else:
            header = layer()
        packet = packet / header
    if not transport.haslayer(TCP) and not transport.haslayer(UDP) and not transport.haslayer(ICMPv6EchoRequest):
        packet.lastlayer().nh = rng.choice([47, 50, 59, 132])
    return packet / transport


def random_frame(rng: random.Random) -> tuple[int, bytes]:
    network = random_network(rng)
    ethertype = 0x0800 if network.haslayer(IP) and not network.haslayer(IPv6) else 0x86DD
    version = 4 if ethertype == 0x0800 else 6
    link = rng.choice(["ether", "vlan", "qinq", "sll", "sll2", "null", "raw", "raw_family"])
    if link == "ether":
        return LINKTYPE_ETHERNET, bytes(Ether(**MACS) / network)
    if link == "vlan":
        return LINKTYPE_ETHERNET, bytes(Ether(**MACS) / Dot1Q(vlan=rng.randrange(4096)) / network)
    if link == "qinq":
        tags = Dot1AD(vlan=rng.randrange(4096)) / Dot1Q(vlan=rng.randrange(4096))
        if rng.random() < 0.5:
            tags = tags / Dot1Q(vlan=rng.randrange(4096))
        return LINKTYPE_ETHERNET, bytes(Ether(**MACS) / tags / network)
    if link == "sll":
        return LINKTYPE_LINUX_SLL, bytes(CookedLinux(pkttype=rng.randrange(5), proto=ethertype) / network)
    if link == "sll2":
        return LINKTYPE_LINUX_SLL2, bytes(CookedLinuxV2(pkttype=rng.randrange(5), proto=ethertype) / network)
    if link == "null":
        family = 2 if version == 4 else rng.choice([24, 28, 30])
        order = rng.choice(["little", "big"])
        return LINKTYPE_NULL, family.to_bytes(4, order) + bytes(network)
    if link == "raw":
        return rng.choice([LINKTYPE_RAW_12, LINKTYPE_RAW_14, LINKTYPE_RAW]), bytes(network)
    return (LINKTYPE_IPV4 if version == 4 else LINKTYPE_IPV6), bytes(network)
