"""decode_frame: agreement with Scapy's dissection, edge cases, and no exception on any input."""
import ipaddress
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
                                IPv6ExtHdrHopByHop, IPv6ExtHdrRouting)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Dot1Q, Ether
from scapy.packet import Raw

from exporter.decode import (LINKTYPE_ETHERNET, LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2,
                             LINKTYPE_LOOP, LINKTYPE_NULL, LINKTYPE_RAW, LINKTYPE_RAW_12, LINKTYPE_RAW_14, MALFORMED,
                             NOT_IP, decode_frame, supported_link_types)
from exporter.frames import SourceError
from exporter.replay import PcapSource
from tests.builders import CORPUS_PCAPS, LINKTYPE_USER0, MACS, frames_of, random_address, random_frame

DLT_EN3MB = 2  # 3 Mb experimental Ethernet (pcap/dlt.h): no pcap link type, and nothing we decode
EXTENSION_LAYERS = (IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, AH)
NEXT_HEADER_LAYERS = {0: IPv6ExtHdrHopByHop, 43: IPv6ExtHdrRouting, 60: IPv6ExtHdrDestOpt, 44: IPv6ExtHdrFragment,
                      51: AH, 6: TCP, 17: UDP}


def scapy_view(link_type: int, data: bytes):
    """The oracle: Scapy's dissection reduced to (src, dst, transport protocol, sport, dport)."""
    if link_type == LINKTYPE_ETHERNET:
        packet = Ether(data)
    elif link_type == LINKTYPE_LINUX_SLL:
        packet = CookedLinux(data)
    elif link_type == LINKTYPE_LINUX_SLL2:
        packet = CookedLinuxV2(data)
    elif link_type == LINKTYPE_NULL:
        family = int.from_bytes(data[:4], "little")
        family = family if family <= 0xFFFF else int.from_bytes(data[:4], "big")
        packet = IP(data[4:]) if family == 2 else IPv6(data[4:])
    elif link_type == LINKTYPE_IPV6 or (link_type in (LINKTYPE_RAW_12, LINKTYPE_RAW_14, LINKTYPE_RAW)
                                        and data[0] >> 4 == 6):
        packet = IPv6(data)
    else:
        packet = IP(data)
    ip = packet
    while not isinstance(ip, (IP, IPv6)):  # the outermost IP header
        ip = ip.payload
    if isinstance(ip, IP):
        if ip.frag:
            return ip.src, ip.dst, ip.proto, -1, -1
        layer, proto = ip.payload, ip.proto
    else:
        layer, proto = ip.payload, ip.nh
        while isinstance(layer, EXTENSION_LAYERS):
            proto = layer.nh
            if isinstance(layer, IPv6ExtHdrFragment) and layer.offset:
                return ip.src, ip.dst, proto, -1, -1
            if isinstance(layer, AH):
                # Scapy stops dissecting after AH inside IPv6; dissect what follows by its next header.
                layer = NEXT_HEADER_LAYERS.get(proto, Raw)(bytes(layer.payload))
                continue
            layer = layer.payload
    if isinstance(layer, (TCP, UDP)):
        return ip.src, ip.dst, proto, layer.sport, layer.dport
    return ip.src, ip.dst, proto, -1, -1


def as_view(decoded):
    src, dst, ip_proto, sport, dport = decoded
    return str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)), ip_proto, sport, dport


def is_decoded(result):
    return isinstance(result, tuple) and len(result) == 5


# Bytes around a frame inside a capture buffer: a whole IPv4/TCP frame, so that reading past the
# frame's end would decode to something plausible -- and wrong.
SURROUNDINGS = bytes(Ether(**MACS) / IP(src="198.51.100.1", dst="198.51.100.2") / TCP(sport=1, dport=2))


def decode_in_buffer(link_type: int, data: bytes):
    """The frame read in place inside a larger capture buffer, as batches are."""
    buffer = SURROUNDINGS[:13] + data + SURROUNDINGS
    return decode_frame(link_type, buffer, 13, 13 + len(data))


def test_decode_agrees_with_scapy_dissection_on_random_frames():
    rng = random.Random(20261125)
    kinds = set()
    for _ in range(3000):
        link_type, data = random_frame(rng)
        decoded = decode_frame(link_type, data)
        assert is_decoded(decoded), (link_type, data.hex())
        expected = scapy_view(link_type, data)
        assert as_view(decoded) == expected, (link_type, data.hex())
        assert decode_in_buffer(link_type, data) == decoded, (link_type, data.hex())
        kinds.add((link_type, len(decoded[0]), decoded[3] >= 0))
    # the generator really covered every link type, both IP versions, with and without ports
    assert {k[0] for k in kinds} == supported_link_types() - {LINKTYPE_LOOP}
    assert {(k[1], k[2]) for k in kinds} == {(4, True), (4, False), (16, True), (16, False)}


def test_loop_link_type_reads_family_in_network_order():
    data = (2).to_bytes(4, "big") + bytes(IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=53, dport=4000))
    assert as_view(decode_frame(LINKTYPE_LOOP, data)) == ("192.0.2.1", "192.0.2.2", 17, 53, 4000)


@pytest.mark.parametrize("link_type, data", [
    (LINKTYPE_ETHERNET, bytes(Ether(**MACS) / Raw(b"\x00" * 40))[:12]),  # shorter than an Ethernet header
    (LINKTYPE_ETHERNET, bytes(Ether(type=0x0800) / Raw(b"\x45" + b"\x00" * 10))),  # IPv4 header cut short
    (LINKTYPE_ETHERNET, bytes(Ether(type=0x0800)) + bytes(IPv6())),  # IPv6 inside an IPv4 ethertype
    (LINKTYPE_ETHERNET, bytes(Ether(**MACS) / Dot1Q())[:16]),  # VLAN tag cut short
    (LINKTYPE_RAW, b""),
    (LINKTYPE_RAW, b"\x50" + b"\x00" * 39),  # IP version 5
    (LINKTYPE_IPV4, bytes(IP(ihl=4) / TCP())),  # header length below 20
    (LINKTYPE_IPV4, bytes(IP(ihl=15))),  # header length beyond the data
    (LINKTYPE_IPV6, bytes(IPv6())[:39]),
    (LINKTYPE_LINUX_SLL, b"\x00" * 15),
    (LINKTYPE_LINUX_SLL2, b"\x00" * 19),
    (LINKTYPE_NULL, b"\x02\x00"),
    (LINKTYPE_USER0, bytes(IP() / TCP())),  # a link type we do not decode
])
def test_undecodable_frames_are_malformed(link_type, data):
    assert decode_frame(link_type, data) == MALFORMED


@pytest.mark.parametrize("link_type, data", [
    (LINKTYPE_ETHERNET, bytes(Ether(type=0x0806) / Raw(b"\x00" * 28))),  # ARP
    (LINKTYPE_ETHERNET, bytes(Ether(type=0x05DC) / Raw(b"\x00" * 28))),  # 802.3 length field
    (LINKTYPE_LINUX_SLL, bytes(CookedLinux(proto=0x0004) / Raw(b"\x00" * 20))),
    (LINKTYPE_NULL, (17).to_bytes(4, "little") + b"\x00" * 20),  # AF_IMPLINK
])
def test_frames_without_ip_are_not_ip(link_type, data):
    assert decode_frame(link_type, data) == NOT_IP


def test_truncated_transport_header_keeps_addresses_without_ports():
    data = bytes(IP(src="192.0.2.1", dst="192.0.2.2") / TCP(sport=1234, dport=80))[:20 + 19]
    assert as_view(decode_frame(LINKTYPE_IPV4, data)) == ("192.0.2.1", "192.0.2.2", 6, -1, -1)


def test_extension_chain_running_past_the_data_keeps_addresses():
    data = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop() / TCP())[:44]
    assert as_view(decode_frame(LINKTYPE_IPV6, data)) == ("2001:db8::1", "2001:db8::2", 0, -1, -1)


def mutated(data: bytes, mutations: list[tuple[int, int]], cut: int) -> bytes:
    """``data`` (one zero byte if empty) with bytes overwritten at positions taken modulo its length, then cut."""
    frame = bytearray(data) or bytearray(1)
    for position, value in mutations:
        frame[position % len(frame)] = value
    return bytes(frame[:cut % (len(frame) + 1)])


@settings(max_examples=3000, deadline=None)
@given(link_type=st.sampled_from(sorted(supported_link_types()) + [DLT_EN3MB, LINKTYPE_USER0]),
       data=st.binary(max_size=200))
def test_random_bytes_never_raise(link_type, data):
    result = decode_frame(link_type, data)
    assert result in (MALFORMED, NOT_IP) or is_decoded(result)
    assert decode_in_buffer(link_type, data) == result


@settings(max_examples=1500, deadline=None)
@given(seed=st.integers(0, 2**32), mutations=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                      max_size=8), cut=st.integers(0, 10**6))
def test_mutated_real_frames_never_raise(seed, mutations, cut):
    link_type, data = random_frame(random.Random(seed))
    frame = mutated(data, mutations, cut)
    result = decode_frame(link_type, frame)
    assert result in (MALFORMED, NOT_IP) or is_decoded(result)
    assert decode_in_buffer(link_type, frame) == result
    if is_decoded(result):
        assert len(result[0]) == len(result[1]) in (4, 16)


def corpus_frames():
    frames = []
    for path in sorted(CORPUS_PCAPS.iterdir()):
        try:
            for batch in PcapSource(str(path)).batches(threading.Event()):
                frames.extend((batch.link_type, frame.data) for frame in frames_of(batch)[:200])
        except SourceError:
            pass  # a truncated fuzz file: the frames read before the error are kept
    return frames


CORPUS_FRAMES = corpus_frames()


@settings(max_examples=2000, deadline=None)
@given(index=st.integers(0, len(CORPUS_FRAMES) - 1),
       mutations=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.integers(0, 10**6))
def test_mutated_corpus_frames_never_raise(index, mutations, cut):
    link_type, data = CORPUS_FRAMES[index]
    frame = mutated(data, mutations, cut)
    result = decode_frame(link_type, frame)
    assert result in (MALFORMED, NOT_IP) or is_decoded(result)
    assert decode_in_buffer(link_type, frame) == result


@settings(max_examples=1500, deadline=None)
@given(seed=st.integers(0, 2**32), mutations=st.lists(st.tuples(st.integers(0, 79), st.integers(0, 255)), max_size=3),
       cut=st.integers(30, 200))
def test_common_frames_mutated_or_cut_decode_the_same_in_place(seed, mutations, cut):
    # Frames of common shapes (Ethernet, maybe one VLAN tag, IPv4/IPv6, TCP/UDP/ICMP), with header
    # bytes changed or cut short, read inside a larger buffer: nothing past the frame's end is read.
    rng = random.Random(seed)
    version = rng.choice([4, 6])
    network = (IP(src=random_address(rng, 4), dst=random_address(rng, 4), frag=rng.choice([0, 0, 0, 5]))
               if version == 4 else IPv6(src=random_address(rng, 6), dst=random_address(rng, 6)))
    transport = rng.choice([TCP(sport=rng.randrange(65536), dport=80), UDP(sport=53, dport=rng.randrange(65536)),
                            ICMP() if version == 4 else ICMPv6EchoRequest()])
    packet = network / transport / Raw(bytes(rng.randrange(64)))
    ether = Ether(**MACS)
    frame = bytearray(bytes(ether / Dot1Q(vlan=rng.randrange(4096)) / packet if rng.random() < 0.3 else ether / packet))
    for position, value in mutations:
        frame[position % len(frame)] = value
    frame = bytes(frame[:cut])
    assert decode_in_buffer(LINKTYPE_ETHERNET, frame) == decode_frame(LINKTYPE_ETHERNET, frame)
