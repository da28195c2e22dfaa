"""Pure parts of live capture: auxdata, VLAN re-insertion, SLL headers, BPF adaptation, default route."""
from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import CookedLinux, Dot1AD, Dot1Q, Ether

from exporter import config as config_module
from exporter.decode import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_RAW, decode_frame
from exporter.live import (AUXDATA, ETH_P_8021Q, PACKET_OUTGOING, SKF_AD_OFF, SKF_AD_PKTTYPE, SKF_AD_PROTOCOL,
                           TP_STATUS_VLAN_TPID_VALID, TP_STATUS_VLAN_VALID, FilterError, adapt_bpf_for_kernel,
                           compile_bpf, default_route_interface, insert_vlan_tag, parse_auxdata,
                           permission_message, restore_frame, sll_header)

PROC_NET_ROUTE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wlan0\t00000000\t0100A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth2\t00000000\t010200C0\t0002\t0\t0\t0\t00000000\t0\t0\t0
"""
PROC_NET_IPV6_ROUTE = """\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     wg0
"""


def auxdata(length: int, *, status: int = 0, tci: int = 0, tpid: int = 0) -> bytes:
    return AUXDATA.pack(status, length, length, 0, 14, tci, tpid)


def address(pkttype: int = 0, hatype: int = 1, mac: bytes = b"\x02\x00\x00\x00\x00\x01",
            protocol: int = 0x0800, interface: str = "eth0") -> tuple:
    """What Python returns as a sockaddr_ll: (interface, protocol, pkttype, hatype, address)."""
    return (interface, protocol, pkttype, hatype, mac)


def test_default_route_interface_picks_the_lowest_metric_ipv4_default_route_that_is_up():
    assert default_route_interface(PROC_NET_ROUTE, PROC_NET_IPV6_ROUTE) == "eth0"


def test_default_route_interface_falls_back_to_ipv6_skipping_lo_reject_routes():
    only_subnets = PROC_NET_ROUTE.splitlines()[0] + "\n" + PROC_NET_ROUTE.splitlines()[1] + "\n"
    assert default_route_interface(only_subnets, PROC_NET_IPV6_ROUTE) == "wg0"


def test_default_route_interface_is_none_without_any_default_route():
    assert default_route_interface(PROC_NET_ROUTE.splitlines()[0], PROC_NET_IPV6_ROUTE.splitlines()[0]) is None
    assert default_route_interface("", "") is None
    assert default_route_interface("garbage\nnot a route table\n", "x y z") is None


def test_parse_auxdata_reports_no_tag_when_the_kernel_saw_none():
    assert parse_auxdata(auxdata(1514)) == (1514, None)


def test_parse_auxdata_reports_an_8021q_tag_when_the_tpid_is_not_given():
    assert parse_auxdata(auxdata(60, status=TP_STATUS_VLAN_VALID, tci=0x600A)) == (60, (ETH_P_8021Q, 0x600A))


def test_parse_auxdata_uses_the_kernel_tpid_when_valid():
    status = TP_STATUS_VLAN_VALID | TP_STATUS_VLAN_TPID_VALID
    assert parse_auxdata(auxdata(60, status=status, tci=20, tpid=0x88A8)) == (60, (0x88A8, 20))


def test_parse_auxdata_treats_a_nonzero_tci_as_a_tag_like_libpcap():
    assert parse_auxdata(auxdata(60, tci=5)) == (60, (ETH_P_8021Q, 5))


def test_insert_vlan_tag_rebuilds_the_frame_scapy_built():
    tagged = bytes(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / Dot1Q(vlan=10, prio=3)
                   / IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=1234, dport=53) / b"query")
    stripped = tagged[:12] + tagged[16:]  # what veth hands a packet socket: tag out of band
    assert insert_vlan_tag(stripped, 12, 0x8100, (3 << 13) | 10) == tagged


def test_restore_frame_puts_a_stripped_8021q_tag_back_and_counts_its_4_bytes():
    tagged = bytes(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / Dot1Q(vlan=10)
                   / IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=1234, dport=53) / (b"x" * 100))
    stripped = tagged[:12] + tagged[16:]
    wire_length, data = restore_frame(LINKTYPE_ETHERNET, stripped, len(stripped),
                                      auxdata(len(stripped), status=TP_STATUS_VLAN_VALID, tci=10), address())
    assert (wire_length, data) == (len(tagged), tagged)
    assert Ether(data)[Dot1Q].vlan == 10
    assert tuple(decode_frame(LINKTYPE_ETHERNET, data)) == (bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1]), 17, 1234, 53)


def test_restore_frame_restores_the_outer_qinq_tag_with_the_kernel_tpid():
    tagged = bytes(Ether() / Dot1AD(vlan=20) / Dot1Q(vlan=30) / IPv6(src="fd00::2", dst="fd00::1")
                   / UDP(sport=4000, dport=443))
    stripped = tagged[:12] + tagged[16:]  # the kernel strips the outer tag only
    status = TP_STATUS_VLAN_VALID | TP_STATUS_VLAN_TPID_VALID
    wire_length, data = restore_frame(LINKTYPE_ETHERNET, stripped, len(stripped),
                                      auxdata(len(stripped), status=status, tci=20, tpid=0x88A8), address())
    assert (wire_length, data) == (len(tagged), tagged)


def test_restore_frame_takes_the_full_length_from_auxdata_not_from_what_was_copied():
    frame = bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / (b"y" * 200))
    wire_length, data = restore_frame(LINKTYPE_ETHERNET, frame[:100], 100, auxdata(65000 + 14), address())
    assert (wire_length, data) == (65014, frame[:100])


def test_restore_frame_without_auxdata_keeps_recvmsg_length():
    frame = bytes(Ether() / IP() / UDP())
    assert restore_frame(LINKTYPE_ETHERNET, frame, 70000, None, address()) == (70000, frame)


def test_restore_frame_builds_the_sll_header_libpcap_builds_for_cooked_frames():
    payload = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=53, dport=5353) / b"answer")
    mac = b"\x02\x00\x00\x00\x00\x01"
    wire_length, data = restore_frame(LINKTYPE_LINUX_SLL, payload, len(payload), auxdata(len(payload)),
                                      address(pkttype=PACKET_OUTGOING, mac=mac))
    assert wire_length == len(payload) + 16
    expected = bytes(CookedLinux(pkttype=PACKET_OUTGOING, lladdrtype=1, lladdrlen=6, src=mac + b"\0\0",
                                 proto=0x0800) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=53, dport=5353)
                     / b"answer")
    assert data == expected
    assert decode_frame(LINKTYPE_LINUX_SLL, data)[2:] == (17, 53, 5353)


def test_restore_frame_inserts_a_cooked_vlan_tag_before_the_sll_protocol():
    payload = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2))
    wire_length, data = restore_frame(LINKTYPE_LINUX_SLL, payload, len(payload),
                                      auxdata(len(payload), status=TP_STATUS_VLAN_VALID, tci=7), address())
    assert wire_length == len(payload) + 16 + 4
    assert data[14:20] == bytes.fromhex("8100 0007 0800")
    assert decode_frame(LINKTYPE_LINUX_SLL, data)[2:] == (17, 1, 2)


def test_restore_frame_leaves_raw_ip_frames_untagged():
    payload = bytes(IP() / UDP())
    assert restore_frame(LINKTYPE_RAW, payload, len(payload), auxdata(len(payload), status=TP_STATUS_VLAN_VALID,
                                                                      tci=7), address()) == (len(payload), payload)


def test_sll_header_truncates_long_hardware_addresses_to_8_bytes_but_keeps_their_length():
    header = sll_header(0, 32, bytes(range(20)), 0x86DD)
    assert header == struct.pack("!HHH8sH", 0, 32, 20, bytes(range(8)), 0x86DD)


def test_compile_bpf_reports_the_compiler_message():
    with pytest.raises(FilterError, match=r"invalid BPF filter 'tcp and and': .*syntax error"):
        compile_bpf("tcp and and", LINKTYPE_ETHERNET)


def test_adapt_bpf_never_trims_accepted_frames():
    program = adapt_bpf_for_kernel(compile_bpf("udp", LINKTYPE_ETHERNET), cooked=False)
    returns = {k for code, _jt, _jf, k in program if code & 0x07 == 0x06}
    assert returns == {0, 262144}


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


def test_permission_message_is_one_line_naming_every_fix():
    message = permission_message("eth0")
    assert "\n" not in message
    for advice in ("CAP_NET_RAW", "sudo", "setcap cap_net_raw,cap_net_admin+eip /", "cap_add: [NET_RAW, NET_ADMIN]"):
        assert advice in message


def test_user_flag_accepts_known_users_and_refuses_unknown_ones():
    assert config_module.parse_config(["--user", "root"], environ={}).user == "root"
    assert config_module.parse_config([], environ={"TRAFFIC_USER": "0"}).user == "0"
    assert config_module.parse_config([], environ={"TRAFFIC_USER": ""}).user is None
    with pytest.raises(config_module.ConfigError, match=r"--user: no such user"):
        config_module.parse_config(["--user", "te-no-such-user"], environ={})


def fake_interfaces(monkeypatch):
    from exporter import live

    interfaces = {
        "lo": live.Interface("lo", 1, live.ARPHRD_LOOPBACK, True, ("127.0.0.1", "::1")),
        "eth0": live.Interface("eth0", 2, live.ARPHRD_ETHER, True,
                               ("192.0.2.10", "192.0.2.11", "2001:db8::10", "fe80::1", "fd00::10")),
        "wg0": live.Interface("wg0", 3, live.ARPHRD_NONE, True, ("10.8.0.1", "fe80::2")),
    }
    monkeypatch.setattr(live, "list_interfaces", lambda: interfaces)
    return live


def test_server_addresses_are_ipv4_and_global_ipv6_of_the_interface_without_link_local(monkeypatch):
    live = fake_interfaces(monkeypatch)
    assert live.server_addresses("eth0") == ("192.0.2.10", "192.0.2.11", "2001:db8::10", "fd00::10")
    assert live.server_addresses("wg0") == ("10.8.0.1",)


def test_server_addresses_for_any_cover_every_interface_but_loopback(monkeypatch):
    live = fake_interfaces(monkeypatch)
    assert live.server_addresses("any") == ("192.0.2.10", "192.0.2.11", "2001:db8::10", "fd00::10", "10.8.0.1")


def test_a_missing_interface_is_a_source_error_naming_the_ones_that_exist(monkeypatch):
    from exporter.sources import SourceError

    live = fake_interfaces(monkeypatch)
    with pytest.raises(SourceError, match=r"no interface named 'eth9' \(available: eth0, lo, wg0, any\)"):
        live.LiveSource("eth9")
    with pytest.raises(live.InterfaceNotFound):
        live.server_addresses("eth9")
