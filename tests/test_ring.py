"""The TPACKET_V3 ring: blocks read in place (VLAN tags, cooked frames, loopback copies) and sized."""
from __future__ import annotations

import errno
import mmap
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, CookedLinux, Dot1AD, Dot1Q, Ether

from exporter.decode import ETHERNET_HEADER_LENGTH, LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, NOT_IP, decode_frame
from exporter.frames import SourceError
from exporter.interfaces import ARPHRD_ETHER
from exporter.ring import PACKET_OUTGOING, RING_RETIRE_MS, SOCKADDR_LL_END, TP_STATUS_USER, TP_STATUS_VLAN_VALID, read_block, ring_request
from tests.builders import Frame, MACS, frames_of, spans_of


ETHERNET_MAC_OFFSET = 82  # where the kernel puts an Ethernet frame after its tpacket3_hdr (SOCK_RAW)

COOKED_MAC_OFFSET = 96  # where it puts the network header (SOCK_DGRAM)

PACKET_PACKET_HOST = 0

TP_STATUS_VLAN_TPID_VALID = 0x40  # the kernel's tp_vlan_tpid holds the tag's TPID


class RingFrame:
    """One frame as the kernel lays it out in a TPACKET_V3 block: tpacket3_hdr, sockaddr_ll, data."""

    def __init__(self, data: bytes, *, wire_length: int = 0, status: int = TP_STATUS_USER, tci: int = 0,
                 tpid: int = 0, mac: int = ETHERNET_MAC_OFFSET, ifindex: int = 2, pkttype: int = 0,
                 hatype: int = ARPHRD_ETHER, address: bytes = b"\x02\x00\x00\x00\x00\x01", protocol: int = 0x0800,
                 time: tuple[int, int] = (1700000000, 5)):
        self.time = time
        self.data, self.wire_length, self.status = data, wire_length or len(data), status
        self.tci, self.tpid = tci, tpid
        self.mac, self.ifindex, self.pkttype, self.hatype, self.address = mac, ifindex, pkttype, hatype, address
        self.protocol = protocol

    def pack(self, last: bool) -> bytes:
        size = (self.mac + len(self.data) + 15) & ~15  # TPACKET_ALIGN: each frame starts 16-byte aligned
        record = bytearray(size)
        # tp_next_offset (0 for a block's last frame), tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status,
        # tp_mac, tp_net, hv1 (tp_rxhash, tp_vlan_tci, tp_vlan_tpid, padding), padding
        struct.pack_into("=IIIIIIHHIIHH8x", record, 0, 0 if last else size, *self.time, len(self.data),
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


def test_read_block_gives_each_frame_its_tp_sec_and_tp_nsec_when_asked():
    frames = [RingFrame(ethernet_udp(), time=(1700000000, 250_000_000)), RingFrame(ethernet_udp(), time=(1700000001, 7))]
    batch = read_block(ring_block(frames), 0, LINKTYPE_ETHERNET, 0, timestamps=True)
    assert batch.timestamps.tolist() == [1700000000.25, 1700000001 + 7e-9]
    assert read_block(ring_block(frames), 0, LINKTYPE_ETHERNET, 0).timestamps is None


def test_read_block_returns_nothing_for_an_empty_block():
    assert len(read_block(ring_block([]), 0, LINKTYPE_ETHERNET, 0)) == 0


def test_read_block_takes_the_wire_length_from_tp_len_not_from_what_was_copied():
    aggregate = ethernet_udp(b"y" * 200)[:96]  # a GRO aggregate cut short by the snap length
    batch = read_block(ring_block([RingFrame(aggregate, wire_length=65014)]), 0, LINKTYPE_ETHERNET, 0)
    assert frames_of(batch) == [Frame(65014, aggregate)]


def test_read_block_counts_the_4_bytes_of_stripped_vlan_tags_and_decodes_as_if_tagged():
    tagged = bytes(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / Dot1Q(vlan=10)
                   / IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=1234, dport=53) / (b"x" * 100))
    qinq = bytes(Ether(**MACS) / Dot1AD(vlan=20) / Dot1Q(vlan=30) / IPv6(src="fd00::2", dst="fd00::1")
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
    from exporter import ring as live

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
