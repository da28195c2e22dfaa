"""testkit/forwarder.py's frame parsing and drop rules, on Scapy-built frames (the live test is in integration/)."""
from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from testkit.forwarder import DropRules, Segment, tcp_segment

ETHER = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01")
OPTIONS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 2)), ("WScale", 7)]


def test_tcp_segment_reads_addresses_ports_sequence_and_payload_length_of_ipv4_and_ipv6():
    v4 = ETHER / IP(src="10.0.0.2", dst="10.0.0.1", options=[]) / TCP(
        sport=40000, dport=80, seq=4_000_000_000, flags="PA", options=OPTIONS) / Raw(b"x" * 700)
    v6 = ETHER / IPv6(src="fd00::2", dst="fd00::1") / TCP(sport=443, dport=50000, seq=7, flags="A") / Raw(b"y" * 3)
    assert tcp_segment(bytes(v4)) == Segment("10.0.0.2", "10.0.0.1", 40000, 80, 4_000_000_000, 700, 0x18)
    assert tcp_segment(bytes(v6)) == Segment("fd00::2", "fd00::1", 443, 50000, 7, 3, 0x10)


def test_tcp_segment_ignores_ethernet_padding_and_counts_a_syn_as_no_payload():
    syn = bytes(ETHER / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=1, dport=2, flags="S"))
    assert len(syn) == 54
    segment = tcp_segment(syn + b"\0" * 6)  # padded to the 60-byte Ethernet minimum
    assert (segment.payload, segment.flags) == (0, 0x02)


@pytest.mark.parametrize("frame", [
    ETHER / IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=1, dport=53) / Raw(b"q" * 30),
    ETHER / IP(src="10.0.0.2", dst="10.0.0.1", flags="MF") / TCP(sport=1, dport=2) / Raw(b"f" * 30),
    ETHER / IPv6(src="fd00::2", dst="fd00::1") / IPv6ExtHdrHopByHop() / TCP(sport=1, dport=2) / Raw(b"h" * 30),
    ETHER / Dot1Q(vlan=5) / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=1, dport=2),
], ids=["udp", "ipv4-fragment", "ipv6-extension-header", "vlan"])
def test_tcp_segment_leaves_frames_it_does_not_read_alone(frame):
    assert tcp_segment(bytes(frame)) is None


def test_tcp_segment_refuses_a_truncated_frame():
    frame = bytes(ETHER / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=1, dport=2) / Raw(b"z" * 100))
    assert tcp_segment(frame[:60]) is None


def test_drop_rules_drop_the_chosen_numbers_in_their_direction_only():
    rules = DropRules({"in": frozenset({2}), "out": frozenset({1, 3})})
    assert [rules.drop("out", n) for n in range(1, 5)] == [True, False, True, False]
    assert [rules.drop("in", n) for n in range(1, 4)] == [False, True, False]


def test_seeded_drops_are_the_same_for_the_same_seed_and_rate_is_near_the_probability():
    def dropped(seed: int) -> list[int]:
        rules = DropRules(probability=0.1, seed=seed)
        return [n for n in range(1, 5001) if rules.drop("out", n)]

    assert dropped(3) == dropped(3) != dropped(4)
    assert 400 < len(dropped(3)) < 600
    in_rules = DropRules(probability=1.0, seed=3)  # probability applies to "out" only by default
    assert not any(in_rules.drop("in", n) for n in range(1, 100))
