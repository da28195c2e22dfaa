"""Capture filters: libpcap's message for invalid ones, the snap length, cooked programs adapted for the kernel."""
from __future__ import annotations


import pytest
from scapy.layers.inet import TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, PadN
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether

from exporter.bpf import CAPTURE_SNAPLEN, SKF_AD_OFF, SKF_AD_PKTTYPE, SKF_AD_PROTOCOL, FilterError, adapt_bpf_for_kernel, compile_bpf
from exporter.decode import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, decode_frame
from tests.builders import MACS


def test_compile_bpf_reports_the_compiler_message():
    with pytest.raises(FilterError, match=r"invalid BPF filter 'tcp and and': .*syntax error"):
        compile_bpf("tcp and and", LINKTYPE_ETHERNET)


def test_adapt_bpf_keeps_the_capture_snaplen_of_accepted_frames():
    program = adapt_bpf_for_kernel(compile_bpf("udp", LINKTYPE_ETHERNET), cooked=False)
    returns = {k for code, _jt, _jf, k in program if code & 0x07 == 0x06}
    assert returns == {0, CAPTURE_SNAPLEN}


def test_capture_snaplen_holds_every_header_the_decoder_reads():
    # QinQ, IPv6 with 136 bytes of extension headers, TCP: cut to the snap length, it decodes the same.
    frame = bytes(Ether(**MACS) / Dot1AD(vlan=1) / Dot1Q(vlan=2) / IPv6(src="fd00::2", dst="fd00::1")
                  / IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\0" * 62)]) / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0" * 62)])
                  / TCP(sport=40000, dport=443) / (b"x" * 1000))
    assert decode_frame(LINKTYPE_ETHERNET, frame[:CAPTURE_SNAPLEN]) == decode_frame(LINKTYPE_ETHERNET, frame)
    assert decode_frame(LINKTYPE_ETHERNET, frame[:CAPTURE_SNAPLEN])[3:] == (40000, 443)


def test_adapt_bpf_maps_cooked_header_fields_to_kernel_ancillary_loads():
    original = compile_bpf("inbound and ip", LINKTYPE_LINUX_SLL)
    adapted = adapt_bpf_for_kernel(original, cooked=True)
    loads = [k for code, _jt, _jf, k in adapted if code & 0x07 == 0x00 and code & 0xE0 == 0x20]
    assert loads == [SKF_AD_OFF + SKF_AD_PKTTYPE, SKF_AD_OFF + SKF_AD_PROTOCOL]


def test_adapt_bpf_moves_cooked_payload_offsets_down_16_bytes():
    original = compile_bpf("udp port 53", LINKTYPE_LINUX_SLL)
    adapted = adapt_bpf_for_kernel(original, cooked=True)
    for (code, _, _, k_before), (_, _, _, k_after) in zip(original, adapted):
        if code & 0x07 == 0x00 and code & 0xE0 in (0x20, 0x40) and 16 <= k_before < SKF_AD_OFF:
            assert k_after == k_before - 16


def test_adapt_bpf_refuses_cooked_filters_on_other_sll_fields():
    program = [(0x28, 0, 0, 6), (0x06, 0, 0, 0xFFFF)]  # ldh [6]: inside the SLL address
    with pytest.raises(FilterError):
        adapt_bpf_for_kernel(program, cooked=True)
