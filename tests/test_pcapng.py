"""pcapng files read as Scapy and tshark read them; every corruption is one line naming the byte."""
import json
import random
import struct
import threading

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import PcapNgWriter

from exporter.decode import LINKTYPE_ETHERNET, LINKTYPE_IPV6
from exporter.frames import SourceError
from exporter.replay import PcapSource
from tests.builders import CORPUS_PCAPS, Frame, LINKTYPE_USER0, MACS, frames_of, spans_of, summarize
from tests.capture_files import (CORPUS_PCAPNG, ENHANCED_PACKET, IF_NAME, IF_TSOFFSET, IF_TSRESOL, OBSOLETE_PACKET,
                                 SIMPLE_PACKET, Pcapng, assert_same_records, many_sections, odd_section, option, read_all,
                                 read_records, scapy_records, tshark_records, udp_frames)


@pytest.mark.parametrize("name", [path.name for path in CORPUS_PCAPNG])
def test_corpus_pcapng_frames_equal_tsharks(name):
    assert_same_records(read_records(CORPUS_PCAPS / name)[1], tshark_records(CORPUS_PCAPS / name))


@pytest.mark.parametrize("order", ["<", ">"])
def test_every_packet_block_kind_reads_as_scapy_and_tshark_read_it(tmp_path, order):
    file = Pcapng()
    odd_section(file, random.Random(order), order)
    path = file.write(tmp_path / "odd.pcapng")
    batches, ours = read_records(path)
    assert_same_records(ours, scapy_records(path))
    assert_same_records(ours, tshark_records(path))
    assert [batch.link_type for batch in batches for _ in range(len(batch))] == file.link_types
    assert {OBSOLETE_PACKET, SIMPLE_PACKET, ENHANCED_PACKET} <= file.block_types


def test_sections_of_both_byte_orders_read_as_tshark_reads_them(tmp_path):
    path, file = many_sections(tmp_path)
    batches, ours = read_records(path)
    assert_same_records(ours, tshark_records(path))
    assert [batch.link_type for batch in batches for _ in range(len(batch))] == file.link_types
    assert sum(len(frame.data) == 40 < frame.wire_length for _, frame in ours) >= 5  # cut simple packets


def test_a_simple_packet_is_cut_to_its_original_length_the_snaplen_and_the_block(tmp_path):
    file = Pcapng()
    file.section()
    file.interface(LINKTYPE_ETHERNET, 40)
    file.simple(bytes(range(60)))  # more than the snaplen: cut to it
    file.simple(bytes(range(30)))  # padded to 32 bytes in the block: the original length ends it
    file.simple(bytes(range(30)), 50)  # longer on the wire than the block's 32 bytes (padding included): cut to them
    file.section()
    file.interface(LINKTYPE_ETHERNET, 0)  # no snaplen
    file.simple(bytes(range(61)))
    assert read_all(file.write(tmp_path / "simple.pcapng"))[1] == [
        Frame(60, bytes(range(40))), Frame(30, bytes(range(30))), Frame(50, bytes(range(30)) + bytes(2)),
        Frame(61, bytes(range(61)))]


def test_pcapng_written_by_scapy_reads_as_scapy_and_tshark_read_it(tmp_path):
    rng = random.Random(5)
    packets = []
    for index in range(50):
        transport = (TCP() if index % 3 else UDP()) / rng.randbytes(rng.randrange(100))
        if index % 5 == 0:  # a second interface, of another link type
            packet = IPv6(src="2001:db8::2", dst="2001:db8::1") / transport
            packet.sniffed_on = "tun0"
        else:
            packet = Ether(**MACS) / IP(src="192.0.2.2", dst="192.0.2.1") / transport
            packet.sniffed_on = "eth0"
        packet.time = 1_700_000_000 + index / 7
        if index % 4 == 0:
            packet.comments = [b"comment %d" % index]
        packets.append(packet)
    path = tmp_path / "scapy.pcapng"
    with PcapNgWriter(str(path)) as writer:
        writer.write(packets)
    batches, ours = read_records(path)
    assert_same_records(ours, scapy_records(path))
    assert_same_records(ours, tshark_records(path))
    assert [batch.link_type for batch in batches for _ in range(len(batch))] == [
        LINKTYPE_IPV6 if index % 5 == 0 else LINKTYPE_ETHERNET for index in range(50)]


def test_a_pcapng_batch_reads_its_frames_in_place_in_the_file():
    path = CORPUS_PCAPS / "ahcp.pcapng"
    (batch, *_), _ = read_all(path)
    data = path.read_bytes()
    for start, end, wire_length in spans_of(batch):  # the first chunk begins at the start of the file
        assert struct.unpack_from("<I", data, start - 28)[0] == ENHANCED_PACKET
        assert struct.unpack_from("<II", data, start - 8) == (end - start, wire_length)
    assert len(batch.buffer) == len(data)


def valid_start() -> Pcapng:
    file = Pcapng()
    file.section()
    file.interface(LINKTYPE_ETHERNET)
    file.enhanced(0, 1_700_000_000 * 10**6, bytes(60))
    file.simple(bytes(61))
    return file


def corrupt_length(length: int):
    def write(file: Pcapng) -> int:
        return file.raw(struct.pack("<II", ENHANCED_PACKET, length) + bytes(40))
    return write


def packet_block_too_short(file: Pcapng) -> int:
    return file.block(ENHANCED_PACKET, bytes(12))


def packet_on_unknown_interface(file: Pcapng) -> int:
    return file.block(ENHANCED_PACKET, struct.pack("<IIIII", 3, 0, 1, 4, 4) + bytes(4))


def trailing_length_differs(file: Pcapng) -> int:
    offset = file.enhanced(0, 1, bytes(60))
    file.data[-4:] = struct.pack("<I", 100)
    return offset


def cut_in_the_middle(file: Pcapng) -> int:
    offset = file.enhanced(0, 1, bytes(60))
    del file.data[-30:]
    return offset


def captured_beyond_the_block(file: Pcapng) -> int:
    offset = file.enhanced(0, 1, bytes(60))
    struct.pack_into("<I", file.data, offset + 20, 200)
    return offset


def section_with(magic: bytes = b"\x4d\x3c\x2b\x1a", version: tuple[int, int] = (1, 0)):
    def write(file: Pcapng) -> int:
        offset = file.section("<", version)
        file.data[offset + 8:offset + 12] = magic
        return offset
    return write


def interface_with(options: bytes):
    return lambda file: file.interface(LINKTYPE_ETHERNET, 0, options)


def spb_without_interface(file: Pcapng) -> int:
    file.section()
    file.interfaces = [LINKTYPE_ETHERNET]  # the writer's bookkeeping only: the file describes none
    return file.simple(bytes(60))


@pytest.mark.parametrize("corrupt, needle", [
    (corrupt_length(8), "block length 8 "),
    (corrupt_length(62), "block length 62 "),
    (corrupt_length(0xFFFFFFF0), "block length 4294967280 "),
    (packet_block_too_short, "packet block length 24 is below 32"),
    (trailing_length_differs, "trailing block length 100 differs from the leading 92"),
    (captured_beyond_the_block, "captured length 200 goes beyond the block"),
    (packet_on_unknown_interface, "packet on interface 3, but its section describes 1 interface(s)"),
    (spb_without_interface, "simple packet block before any interface description"),
    (section_with(magic=b"\xde\xad\xbe\xef"), "byte-order magic (found deadbeef)"),
    (section_with(version=(2, 0)), "unsupported pcapng version 2.0"),
    (interface_with(struct.pack("<HH", IF_NAME, 100) + b"eth0"), "option 2 of 100 bytes goes beyond"),
    (interface_with(option("<", IF_TSRESOL, b"\x06\x00")), "if_tsresol option of 2 bytes"),
    (interface_with(option("<", IF_TSOFFSET, b"\x06")), "if_tsoffset option of 1 bytes"),
], ids=["length-below-12", "length-not-4-aligned", "length-huge", "packet-block-short", "trailing-length",
        "captured-beyond-block", "unknown-interface", "simple-packet-first", "byte-order-magic", "version",
        "option-overflow", "tsresol-size", "tsoffset-size"])
def test_corrupt_pcapng_is_one_line_naming_the_file_and_the_block_offset(tmp_path, corrupt, needle):
    file = valid_start()
    offset = corrupt(file)
    path = file.write(tmp_path / "corrupt.pcapng")
    delivered = []
    with pytest.raises(SourceError) as error:
        for batch in PcapSource(str(path)).batches(threading.Event()):
            delivered += frames_of(batch)
    assert str(error.value).startswith(f"{path}: corrupt pcapng block at byte {offset}: ")
    assert needle in str(error.value) and "\n" not in str(error.value)
    assert delivered == [Frame(60, bytes(60)), Frame(61, bytes(61))]  # the frames before it count


def test_a_cut_pcapng_reports_truncation_at_its_last_block(tmp_path):
    file = valid_start()
    offset = cut_in_the_middle(file)
    path = file.write(tmp_path / "cut.pcapng")
    with pytest.raises(SourceError, match=f"^{path}: truncated file \\(block at byte {offset} incomplete\\)$"):
        list(PcapSource(str(path)).batches(threading.Event()))


def test_a_pcapng_interface_of_an_unsupported_link_type_is_refused_when_used(tmp_path):
    file = valid_start()
    file.interface(LINKTYPE_USER0)
    path = file.write(tmp_path / "unused.pcapng")
    assert len(read_all(path)[1]) == 2  # described but unused: no harm
    file.enhanced(1, 1, bytes(60))
    file.write(path)
    with pytest.raises(SourceError, match=f"^{path}: unsupported link type {LINKTYPE_USER0} "):
        read_all(path)


def test_summarize_counts_simple_packet_blocks_as_the_same_frames_in_a_classic_pcap(tmp_path, write_pcap):
    frames = udp_frames(40)
    for index, frame in enumerate(frames):
        frame.time = 1_700_000_000 + index
    reference = write_pcap("same.pcap", frames)  # Scapy's writer: the reference file
    file = Pcapng()
    file.section()
    file.interface(LINKTYPE_ETHERNET)
    for index, frame in enumerate(frames):
        if index % 4:
            file.simple(bytes(frame))
        else:
            file.enhanced(0, (1_700_000_000 + index) * 10**6, bytes(frame))
    path = file.write(tmp_path / "simple.pcapng")
    results = [summarize(name, "--server-ip", "192.0.2.1", "--server-ip", "2001:db8::1", "--format", "json")
               for name in (path, reference)]
    assert [result.returncode for result in results] == [0, 0], results[0].stderr
    assert json.loads(results[0].stdout) == json.loads(results[1].stdout)
    summary = json.loads(results[0].stdout)
    assert summary["packets"] == 40 and summary["total_bytes"] == sum(len(frame) for frame in frames)


@pytest.mark.parametrize("damage", ["half", "huge-block-length"])
def test_summarize_of_a_truncated_or_corrupt_pcapng_is_one_line_and_exit_1(tmp_path, damage):
    file = Pcapng()
    file.section()
    file.interface(LINKTYPE_ETHERNET)
    for frame in udp_frames(20):
        file.enhanced(0, 1, bytes(frame))
    if damage == "half":
        del file.data[len(file.data) // 2 + 1:]  # blocks are 4-byte aligned: this cuts one
    else:
        file.raw(struct.pack("<II", ENHANCED_PACKET, 0xFFFFFFF0) + bytes(40))
    result = summarize(file.write(tmp_path / "damaged.pcapng"), "--server-ip", "192.0.2.1")
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ("truncated file" if damage == "half" else "corrupt pcapng block") in result.stderr
