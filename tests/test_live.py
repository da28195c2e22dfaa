"""Pure parts of live capture: ring blocks (VLAN tags, cooked frames), BPF adaptation, default route."""
from __future__ import annotations

import errno
import mmap
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, PadN
from scapy.layers.l2 import ARP, CookedLinux, Dot1AD, Dot1Q, Ether

from exporter import config as config_module
from exporter.decode import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, NOT_IP, decode_frame
from exporter.live import (CAPTURE_SNAPLEN, ETHERNET_HEADER_LENGTH, PACKET_OUTGOING, RING_RETIRE_MS, SKF_AD_OFF,
                           SKF_AD_PKTTYPE, SKF_AD_PROTOCOL, SOCKADDR_LL_END, TP_STATUS_USER, TP_STATUS_VLAN_VALID,
                           FilterError, adapt_bpf_for_kernel, compile_bpf, default_route_interface,
                           permission_message, read_block, ring_request)
from exporter.sources import Frame, SourceError
from tests.builders import frames_of, spans_of

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


ETHERNET_MAC_OFFSET = 82  # where the kernel puts an Ethernet frame after its tpacket3_hdr (SOCK_RAW)
COOKED_MAC_OFFSET = 96  # where it puts the network header (SOCK_DGRAM)
PACKET_PACKET_HOST = 0
TP_STATUS_VLAN_TPID_VALID = 0x40  # the kernel's tp_vlan_tpid holds the tag's TPID


class RingFrame:
    """One frame as the kernel lays it out in a TPACKET_V3 block: tpacket3_hdr, sockaddr_ll, data."""

    def __init__(self, data: bytes, *, wire_length: int = 0, status: int = TP_STATUS_USER, tci: int = 0,
                 tpid: int = 0, mac: int = ETHERNET_MAC_OFFSET, ifindex: int = 2, pkttype: int = 0,
                 hatype: int = 1, address: bytes = b"\x02\x00\x00\x00\x00\x01", protocol: int = 0x0800):
        self.data, self.wire_length, self.status = data, wire_length or len(data), status
        self.tci, self.tpid = tci, tpid
        self.mac, self.ifindex, self.pkttype, self.hatype, self.address = mac, ifindex, pkttype, hatype, address
        self.protocol = protocol

    def pack(self, last: bool) -> bytes:
        size = (self.mac + len(self.data) + 15) & ~15  # TPACKET_ALIGN: each frame starts 16-byte aligned
        record = bytearray(size)
        # tp_next_offset (0 for a block's last frame), tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status,
        # tp_mac, tp_net, hv1 (tp_rxhash, tp_vlan_tci, tp_vlan_tpid, padding), padding
        struct.pack_into("=IIIIIIHHIIHH8x", record, 0, 0 if last else size, 1700000000, 5, len(self.data),
                         self.wire_length, self.status, self.mac, self.mac, 0xDEADBEEF, self.tci, self.tpid, 0)
        struct.pack_into("=H", record, 48, 17)  # sockaddr_ll: AF_PACKET, ...
        struct.pack_into("!H", record, 50, self.protocol)  # ... protocol in network order, ...
        struct.pack_into("=iHBB8s", record, 52, self.ifindex, self.hatype, self.pkttype, len(self.address),
                         self.address)
        record[self.mac:self.mac + len(self.data)] = self.data
        return bytes(record)


def ring_block(frames: list[RingFrame], *, lead: bytes = b"", first_offset: int = 48) -> bytes:
    """A block handed to user space (TP_STATUS_USER), after ``lead`` bytes of other blocks."""
    records = b"".join(frame.pack(last=i == len(frames) - 1) for i, frame in enumerate(frames))
    # tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1: block_status, num_pkts,
    # offset_to_first_pkt, blk_len, seq_num, ts_first_pkt, ts_last_pkt
    header = struct.pack("=IIIIIIQIIII", 1, 0, TP_STATUS_USER, len(frames), first_offset,
                         first_offset + len(records), 7, 0, 0, 0, 0)
    return lead + header.ljust(first_offset, b"\0") + records


def ethernet_udp(payload: bytes = b"x" * 100, **fields) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01", **fields)
                 / IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=1234, dport=53) / payload)


def test_default_route_interface_picks_the_lowest_metric_ipv4_default_route_that_is_up():
    assert default_route_interface(PROC_NET_ROUTE, PROC_NET_IPV6_ROUTE) == "eth0"


def test_default_route_interface_falls_back_to_ipv6_skipping_lo_reject_routes():
    only_subnets = PROC_NET_ROUTE.splitlines()[0] + "\n" + PROC_NET_ROUTE.splitlines()[1] + "\n"
    assert default_route_interface(only_subnets, PROC_NET_IPV6_ROUTE) == "wg0"


def test_default_route_interface_is_none_without_any_default_route():
    assert default_route_interface(PROC_NET_ROUTE.splitlines()[0], PROC_NET_IPV6_ROUTE.splitlines()[0]) is None
    assert default_route_interface("", "") is None
    assert default_route_interface("garbage\nnot a route table\n", "x y z") is None


def test_read_block_returns_each_frame_of_a_block_following_next_offsets():
    frames = [ethernet_udp(b"a" * 10), ethernet_udp(b"b" * 333), ethernet_udp(b"c" * 1)]
    block = ring_block([RingFrame(frame) for frame in frames])
    batch = read_block(block, 0, LINKTYPE_ETHERNET, 0)
    assert batch.link_type == LINKTYPE_ETHERNET
    assert frames_of(batch) == [Frame(len(f), f) for f in frames]


def test_read_block_reads_a_block_at_its_offset_in_the_ring_and_honours_offset_to_first_packet():
    frame = ethernet_udp()
    block = ring_block([RingFrame(frame), RingFrame(frame)], lead=b"\xff" * 4096, first_offset=64)
    assert frames_of(read_block(block, 4096, LINKTYPE_ETHERNET, 0)) == [Frame(len(frame), frame)] * 2


def test_read_block_returns_nothing_for_an_empty_block():
    assert len(read_block(ring_block([]), 0, LINKTYPE_ETHERNET, 0)) == 0


def test_read_block_takes_the_wire_length_from_tp_len_not_from_what_was_copied():
    aggregate = ethernet_udp(b"y" * 200)[:96]  # a GRO aggregate cut short by the snap length
    batch = read_block(ring_block([RingFrame(aggregate, wire_length=65014)]), 0, LINKTYPE_ETHERNET, 0)
    assert frames_of(batch) == [Frame(65014, aggregate)]


def test_read_block_counts_the_4_bytes_of_stripped_vlan_tags_and_decodes_as_if_tagged():
    tagged = bytes(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / Dot1Q(vlan=10)
                   / IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=1234, dport=53) / (b"x" * 100))
    qinq = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1AD(vlan=20) / Dot1Q(vlan=30) / IPv6(src="fd00::2", dst="fd00::1")
                 / UDP(sport=4000, dport=443))
    plain = ethernet_udp()
    block = ring_block([
        RingFrame(tagged[:12] + tagged[16:], status=TP_STATUS_USER | TP_STATUS_VLAN_VALID, tci=10),
        RingFrame(plain),
        RingFrame(qinq[:12] + qinq[16:], tci=20, tpid=0x88A8,
                  status=TP_STATUS_USER | TP_STATUS_VLAN_VALID | TP_STATUS_VLAN_TPID_VALID),
    ])
    batch = read_block(block, 0, LINKTYPE_ETHERNET, 0)
    assert [wire_length for wire_length, _ in frames_of(batch)] == [len(tagged), len(plain), len(qinq)]
    assert [decode_frame(LINKTYPE_ETHERNET, data) for _, data in frames_of(batch)] == [
        decode_frame(LINKTYPE_ETHERNET, frame) for frame in (tagged, plain, qinq)]


def test_read_block_reads_frames_in_place_in_the_ring():
    frame = ethernet_udp()
    block = ring_block([RingFrame(frame)])
    batch = read_block(block, 0, LINKTYPE_ETHERNET, 0)
    assert batch.buffer is block
    (start, end, _), = spans_of(batch)
    assert block[start:end] == frame


def writable_ring(block: bytes) -> mmap.mmap:
    """The block in shared memory, as the kernel maps its ring: writable, and its slices are bytes."""
    ring = mmap.mmap(-1, len(block))
    ring[:] = block
    return ring


def test_cooked_frames_decode_and_count_as_libpcap_records_them_with_an_sll_header():
    ipv4 = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=53, dport=5353) / b"answer")
    ipv6 = bytes(IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=443, dport=40000) / (b"x" * 300))
    arp = bytes(ARP(psrc="10.0.0.1", pdst="10.0.0.2"))
    frames = [  # (what the kernel delivers, the frame libpcap records)
        (RingFrame(ipv4, mac=COOKED_MAC_OFFSET, pkttype=PACKET_OUTGOING),
         CookedLinux(pkttype=PACKET_OUTGOING, proto=0x0800) / ipv4),
        (RingFrame(ipv6, mac=COOKED_MAC_OFFSET, protocol=0x86DD, pkttype=PACKET_PACKET_HOST),
         CookedLinux(pkttype=PACKET_PACKET_HOST, proto=0x86DD) / ipv6),
        (RingFrame(ipv4, mac=COOKED_MAC_OFFSET, status=TP_STATUS_USER | TP_STATUS_VLAN_VALID, tci=7),
         CookedLinux(proto=0x8100) / Dot1Q(vlan=7, type=0x0800) / ipv4),
        (RingFrame(arp, mac=COOKED_MAC_OFFSET, protocol=0x0806), CookedLinux(proto=0x0806) / arp),
    ]
    ring = writable_ring(ring_block([delivered for delivered, _ in frames]))
    batch = read_block(ring, 0, LINKTYPE_LINUX_SLL, 0)
    assert batch.buffer is ring and batch.link_type == LINKTYPE_ETHERNET  # in place, framed as Ethernet
    assert [(wire_length, decode_frame(batch.link_type, data)) for wire_length, data in frames_of(batch)] == [
        (len(bytes(recorded)), decode_frame(LINKTYPE_LINUX_SLL, bytes(recorded))) for _, recorded in frames]
    assert decode_frame(batch.link_type, frames_of(batch)[3].data) == NOT_IP


def test_read_block_skips_outgoing_copies_on_the_loopback_only():
    payloads = [bytes(IP(src="127.0.0.1", dst="127.0.0.1") / UDP(sport=1, dport=port)) for port in (1, 2, 3)]
    block = ring_block([
        RingFrame(payloads[0], mac=COOKED_MAC_OFFSET, ifindex=1, pkttype=PACKET_OUTGOING),  # loopback, sent: skipped
        RingFrame(payloads[1], mac=COOKED_MAC_OFFSET, ifindex=1, pkttype=PACKET_PACKET_HOST),  # loopback, received
        RingFrame(payloads[2], mac=COOKED_MAC_OFFSET, ifindex=2, pkttype=PACKET_OUTGOING),  # sent on eth0
    ])
    batch = read_block(writable_ring(block), 0, LINKTYPE_LINUX_SLL, 1)
    kept = [data[ETHERNET_HEADER_LENGTH:] for _, data in frames_of(batch)]
    assert kept == payloads[1:]


def test_a_ring_without_room_before_cooked_frames_is_refused_not_misread():
    block = ring_block([RingFrame(bytes(IP() / UDP()), mac=SOCKADDR_LL_END)])
    with pytest.raises(SourceError, match="unexpected capture ring layout"):
        read_block(writable_ring(block), 0, LINKTYPE_LINUX_SLL, 0)


def test_ring_request_uses_4_mib_blocks_one_frame_each_and_the_retire_timeout():
    block_size, blocks, frame_size, frames, retire_ms, priv, features = ring_request(64 << 20)
    assert (block_size, blocks) == (4 << 20, 16)
    assert (frame_size, frames) == (block_size, blocks)  # TPACKET_V3 packs frames of any size into a block
    assert (retire_ms, priv, features) == (RING_RETIRE_MS, 0, 0)


def test_ring_request_for_a_tiny_ring_is_one_page_sized_block():
    assert ring_request(4096)[:4] == (4096, 1, 4096, 1)
    assert ring_request(100)[:4] == (4096, 1, 4096, 1)
    assert ring_request(10000)[:2] == (4096, 2)


def test_a_small_ring_gets_smaller_blocks_to_keep_eight_of_them():
    assert ring_request(4 << 20)[:2] == (512 << 10, 8)
    assert ring_request(16 << 20)[:2] == (2 << 20, 8)


class ShortOfMemorySocket:
    """A socket whose kernel grants a ring of at most ``limit`` bytes (ENOMEM above)."""

    def __init__(self, limit: int):
        self.limit, self.asked = limit, []

    def setsockopt(self, level, option, value):
        block_size, block_count = struct.unpack_from("=II", value)
        self.asked.append(block_size * block_count)
        if block_size * block_count > self.limit:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")


def ring_only_source(ring_bytes: int):
    from exporter import live

    source = live.LiveSource.__new__(live.LiveSource)  # the ring logic alone, no socket opened
    source.ring_bytes, source._ring_shrink_logged = ring_bytes, False
    return source


def test_the_ring_is_halved_while_the_kernel_lacks_memory_and_the_shrink_is_logged_once(caplog):
    source = ring_only_source(128 << 20)
    sock = ShortOfMemorySocket(limit=40 << 20)
    assert source._request_ring(sock)[:2] == (4 << 20, 8)  # 32 MiB
    assert sock.asked == [128 << 20, 64 << 20, 32 << 20]
    source._request_ring(ShortOfMemorySocket(limit=40 << 20))
    assert [record.getMessage() for record in caplog.records] == [
        "not enough kernel memory for a 128 MiB capture ring: using 32 MiB (more drops in bursts)"]


def test_the_ring_shrinks_no_further_than_the_minimum():
    with pytest.raises(OSError) as raised:
        ring_only_source(16 << 20)._request_ring(ShortOfMemorySocket(limit=1 << 20))
    assert raised.value.errno == errno.ENOMEM


def test_compile_bpf_reports_the_compiler_message():
    with pytest.raises(FilterError, match=r"invalid BPF filter 'tcp and and': .*syntax error"):
        compile_bpf("tcp and and", LINKTYPE_ETHERNET)


def test_adapt_bpf_keeps_the_capture_snaplen_of_accepted_frames():
    program = adapt_bpf_for_kernel(compile_bpf("udp", LINKTYPE_ETHERNET), cooked=False)
    returns = {k for code, _jt, _jf, k in program if code & 0x07 == 0x06}
    assert returns == {0, CAPTURE_SNAPLEN}


def test_capture_snaplen_holds_every_header_the_decoder_reads():
    # QinQ, IPv6 with 136 bytes of extension headers, TCP: cut to the snap length, it decodes the same.
    frame = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1AD(vlan=1) / Dot1Q(vlan=2) / IPv6(src="fd00::2", dst="fd00::1")
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
