"""headers.tcp_fields: TCP flags, sequence numbers and payload length as the IP header states them."""
import numpy as np
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from exporter.decode import LINKTYPE_ETHERNET
from exporter.headers import parse_frames, tcp_fields
from tests.builders import MACS

SEGMENT = TCP(sport=40000, dport=80, flags="PA", seq=2**32 - 3, ack=77, options=[("NOP", None)] * 4)


def fields_of(frame: bytes, captured: int = None):
    """tcp_fields of one Ethernet frame, located by parse_frames (the engine's way)."""
    data = frame[:captured] if captured else frame
    starts, ends = np.array([0]), np.array([len(data)])
    _, (v4, v6) = parse_frames(LINKTYPE_ETHERNET, data, starts, ends)
    ip, v6_frame = (v6, True) if len(v6.index) else (v4, False)
    read = tcp_fields(data, v6_frame, starts, ip.network, ip.transport, np.array([len(frame)]))
    return {name: value.tolist()[0] for name, value in read._asdict().items()}


@pytest.mark.parametrize("network", [
    pytest.param(IP(src="10.0.0.2", dst="10.0.0.1"), id="ipv4"),
    pytest.param(IP(src="10.0.0.2", dst="10.0.0.1", options=b"\x94\x04\x00\x00"), id="ipv4-options"),
    pytest.param(IPv6(src="fd00::2", dst="fd00::1") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(), id="ipv6-extensions"),
])
def test_payload_length_is_the_ip_payload_less_the_tcp_header(network):
    fields = fields_of(bytes(Ether(**MACS) / Dot1Q(vlan=5) / network / SEGMENT / Raw(b"x" * 300)))
    assert fields == {"flags": 0x18, "seq": 2**32 - 3, "ack": 77, "payload": 300, "sound": True}


def test_ethernet_padding_and_a_short_snap_length_do_not_change_the_payload_length():
    tiny = bytes(Ether(**MACS) / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(flags="A", seq=9) / Raw(b"y"))
    assert len(tiny) < 60
    assert fields_of(tiny + bytes(60 - len(tiny)))["payload"] == 1
    big = bytes(Ether(**MACS) / IP(src="10.0.0.2", dst="10.0.0.1") / SEGMENT / Raw(b"z" * 1400))
    assert fields_of(big, captured=96)["payload"] == 1400


def test_an_ipv4_fragment_with_more_to_come_is_not_sound():
    frame = bytes(Ether(**MACS) / IP(src="10.0.0.2", dst="10.0.0.1", flags="MF") / SEGMENT / Raw(b"x" * 100))
    assert fields_of(frame)["sound"] is False
