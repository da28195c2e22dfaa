"""Pcap sources: every record read in place, as Scapy and tshark read it; corrupt files refused; paced loops."""
import json
import logging
import pathlib
import random
import shutil
import mmap
import struct
import subprocess
import sys
import threading
import time
from typing import Optional

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import PcapNgWriter, RawPcapNgReader, RawPcapReader, wrpcap

from exporter import sources
from exporter.decode import LINKTYPE_ETHERNET, LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_RAW
from exporter.sources import Frame, FrameBatch, PcapSource, SourceError
from tests.builders import frames_of, spans_of, timestamps_of

CORPUS = pathlib.Path(__file__).parent / "data" / "corpus" / "pcaps"
CORPUS_PCAPNG = sorted(CORPUS.glob("*.pcapng"))

# pcapng block types and options, as the spec (draft-ietf-opsawg-pcapng) numbers them
SECTION_HEADER, INTERFACE, OBSOLETE_PACKET, SIMPLE_PACKET = 0x0A0D0D0A, 1, 2, 3
NAME_RESOLUTION, INTERFACE_STATISTICS, ENHANCED_PACKET, CUSTOM = 4, 5, 6, 0x00000BAD
OPT_END, OPT_COMMENT, IF_NAME, IF_TSRESOL, IF_TSOFFSET, EPB_FLAGS = 0, 1, 2, 9, 14, 2
LINKTYPE_USER0 = 147
MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}  # given: Scapy would look them up on the network


def scapy_records(path: pathlib.Path) -> list[tuple[Optional[float], Frame]]:
    """An oracle: (timestamp, frame) of every record as Scapy's raw readers see them."""
    reader_type = RawPcapNgReader if path.suffix == ".pcapng" else RawPcapReader
    records = []
    with reader_type(str(path)) as reader:
        for data, meta in reader:
            if path.suffix != ".pcapng":
                timestamp = meta.sec + meta.usec / (1e9 if reader.nano else 1e6)
            elif meta.tshigh is None:  # a simple packet block has no timestamp
                timestamp = None
            else:
                timestamp = ((meta.tshigh << 32) + meta.tslow) / meta.tsresol
            records.append((timestamp, Frame(meta.wirelen or len(data), data)))
    return records


def tshark_records(path: pathlib.Path) -> list[tuple[Optional[float], Frame]]:
    """Another oracle: Wireshark's reader (it knows every section, option and block this module reads)."""
    assert shutil.which("tshark"), "tshark (Debian package tshark) is the pcapng oracle: scripts/install.sh installs it"
    output = subprocess.run(["tshark", "-r", str(path), "-T", "json", "-x", "-j", "frame"],
                            capture_output=True, text=True, check=True, timeout=60).stdout
    records = []
    for packet in json.loads(output):
        layers = packet["_source"]["layers"]
        if "frame.interface_id" not in layers["frame"]:
            continue  # tshark shows a custom block as a record, of no interface
        timestamp = layers["frame"].get("frame.time_epoch")  # none for a simple packet block
        data = bytes.fromhex(layers["frame_raw"][0]) if "frame_raw" in layers else b""
        wire_length = int(layers["frame"]["frame.len"])
        records.append((None if timestamp is None else float(timestamp), Frame(wire_length, data)))
    return records


def read_records(path: pathlib.Path) -> tuple[list[FrameBatch], list[tuple[Optional[float], Frame]]]:
    """Our reader as a paced replay uses it, without the pacing: its batches, and (timestamp, frame) pairs."""
    with open(path, "rb") as file:
        batches = list(sources._read_frames(file, str(path), timestamps=True))
    return batches, [record for batch in batches for record in zip(timestamps_of(batch), frames_of(batch))]


def assert_same_records(ours, theirs):
    assert [frame for _, frame in ours] == [frame for _, frame in theirs]
    assert [t is None for t, _ in ours] == [t is None for t, _ in theirs]
    assert [t for t, _ in ours if t is not None] == pytest.approx([t for t, _ in theirs if t is not None], abs=1e-6)


def read_all(path: pathlib.Path, **options) -> tuple[list[FrameBatch], list[Frame]]:
    batches = list(PcapSource(str(path), **options).batches(threading.Event()))
    return batches, [frame for batch in batches for frame in frames_of(batch)]


def option(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + bytes(-len(value) % 4)


class Pcapng:
    """A pcapng file written block by block with struct, independently of the reader under test.

    Each method appends one block and returns its offset; ``link_types`` lists the link type of
    every packet written, in order, and ``block_types`` the type of every block.
    """

    def __init__(self):
        self.data = bytearray()
        self.order = "<"
        self.interfaces: list[int] = []
        self.link_types: list[int] = []
        self.block_types: set[int] = set()

    def block(self, block_type: int, body: bytes) -> int:
        offset = len(self.data)
        self.block_types.add(block_type)
        body += bytes(-len(body) % 4)
        self.data += struct.pack(self.order + "II", block_type, 12 + len(body)) + body
        self.data += struct.pack(self.order + "I", 12 + len(body))
        return offset

    def section(self, order: str = "<", version: tuple[int, int] = (1, 0), options: bytes = b"") -> int:
        self.order, self.interfaces = order, []
        return self.block(SECTION_HEADER, struct.pack(order + "IHHq", 0x1A2B3C4D, *version, -1) + options)

    def interface(self, link_type: int, snaplen: int = 0, options: bytes = b"") -> int:
        self.interfaces.append(link_type)
        return self.block(INTERFACE, struct.pack(self.order + "HHI", link_type, 0, snaplen) + options)

    def enhanced(self, interface_id: int, ticks: int, data: bytes, wire_length: Optional[int] = None,
                 options: bytes = b"") -> int:
        self.link_types.append(self.interfaces[interface_id])
        fields = struct.pack(self.order + "IIIII", interface_id, ticks >> 32, ticks & 0xFFFFFFFF, len(data),
                             len(data) if wire_length is None else wire_length)
        return self.block(ENHANCED_PACKET, fields + data + bytes(-len(data) % 4) + options)

    def obsolete(self, interface_id: int, ticks: int, data: bytes, wire_length: Optional[int] = None) -> int:
        self.link_types.append(self.interfaces[interface_id])
        fields = struct.pack(self.order + "HHIIII", interface_id, 0, ticks >> 32, ticks & 0xFFFFFFFF, len(data),
                             len(data) if wire_length is None else wire_length)
        return self.block(OBSOLETE_PACKET, fields + data)

    def simple(self, data: bytes, wire_length: Optional[int] = None) -> int:
        self.link_types.append(self.interfaces[0])
        original = len(data) if wire_length is None else wire_length
        return self.block(SIMPLE_PACKET, struct.pack(self.order + "I", original) + data)

    def raw(self, data: bytes) -> int:
        offset = len(self.data)
        self.data += data
        return offset

    def write(self, path: pathlib.Path) -> pathlib.Path:
        path.write_bytes(bytes(self.data))
        return path


def frame_bytes(rng: random.Random) -> bytes:
    """Any bytes: the sources do not look inside frames. Odd lengths exercise the 32-bit padding."""
    return rng.randbytes(rng.randrange(1, 200))


def odd_section(file: Pcapng, rng: random.Random, order: str) -> None:
    """One section with three interfaces, every packet block kind and blocks a reader must skip."""
    file.section(order, options=option(order, OPT_COMMENT, b"odd section") + option(order, OPT_END, b""))
    file.block(CUSTOM, struct.pack(order + "I", 32473) + b"skipped custom block")
    file.interface(LINKTYPE_ETHERNET, 65535)  # Scapy cuts a simple packet to the snaplen even when it is 0
    file.interface(LINKTYPE_RAW, 0, option(order, IF_NAME, b"tun0x") + option(order, IF_TSRESOL, bytes([9]))
                   + option(order, OPT_COMMENT, b"nanoseconds") + option(order, OPT_END, b""))
    file.interface(LINKTYPE_IPV4, 0, option(order, IF_TSRESOL, bytes([0x80 | 20])))  # 2^-20 s, no end option
    file.block(NAME_RESOLUTION, struct.pack(order + "HH", 1, 8) + bytes([192, 0, 2, 1]) + b"a.b\0" + bytes(4))
    ticks = {0: 1_700_000_000 * 10**6, 1: 1_700_000_000 * 10**9, 2: 1_700_000_000 << 20}
    for index in range(60):
        interface_id = rng.choice([0, 0, 0, 1, 2])
        ticks[interface_id] += rng.randrange(1, 10**6)
        data = frame_bytes(rng)
        kind = rng.random()
        if kind < 0.6:
            options = b""
            if index % 3 == 0:
                options = (option(order, OPT_COMMENT, b"frame %d" % index)
                           + option(order, EPB_FLAGS, struct.pack(order + "I", 1)) + option(order, OPT_END, b""))
            file.enhanced(interface_id, ticks[interface_id], data, len(data) + rng.choice([0, 0, 1500]), options)
        elif kind < 0.8:
            file.simple(data)
        else:
            file.obsolete(interface_id, ticks[interface_id], data)
        if index % 17 == 0:
            file.block(INTERFACE_STATISTICS, struct.pack(order + "III", 0, 0, 0) + option(order, OPT_END, b""))


def many_sections(tmp_path: pathlib.Path) -> tuple[pathlib.Path, Pcapng]:
    """Sections of both byte orders (and versions 1.0 and 1.2), each with its own interfaces; snaplens
    cutting simple packets; if_tsoffset."""
    rng = random.Random(11)
    file = Pcapng()
    odd_section(file, rng, "<")
    file.section(">", version=(1, 2))
    file.interface(LINKTYPE_IPV4, 40, option(">", IF_TSOFFSET, struct.pack(">q", 1_000_000)))
    file.interface(LINKTYPE_ETHERNET, 0, option(">", IF_TSRESOL, bytes([3])))  # milliseconds
    for index in range(30):
        data = frame_bytes(rng)
        if index % 3 == 0:
            file.simple(data[:40], len(data))  # cut to interface 0's snaplen of 40, as the spec says
        else:
            file.enhanced(index % 2, 1_700_000_000_000 + index, data)
    file.section("<")
    file.interface(LINKTYPE_ETHERNET)  # snaplen 0: a simple packet keeps all the block holds
    for index in range(5):
        file.simple(frame_bytes(rng))
        file.enhanced(0, 1_700_000_100 * 10**6 + index, frame_bytes(rng))
    return file.write(tmp_path / "sections.pcapng"), file


@pytest.mark.parametrize("name", ["mptcp-v0.pcap", "tcp-handshake-nano.pcap", "802.1ad_QinQ.pcap",
                                  *(path.name for path in CORPUS_PCAPNG)])
def test_frames_and_timestamps_equal_scapys_records(name):
    assert_same_records(read_records(CORPUS / name)[1], scapy_records(CORPUS / name))


@pytest.mark.parametrize("name", [path.name for path in CORPUS_PCAPNG])
def test_corpus_pcapng_frames_equal_tsharks(name):
    assert_same_records(read_records(CORPUS / name)[1], tshark_records(CORPUS / name))


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


@pytest.mark.parametrize("name", ["mptcp-v0.pcap", "sections.pcapng"])
def test_records_split_across_chunks_and_batches_are_read_whole(monkeypatch, tmp_path, name):
    path = many_sections(tmp_path)[0] if name.endswith(".pcapng") else CORPUS / name
    _, expected = read_all(path)
    monkeypatch.setattr(sources, "READ_CHUNK", 97)  # smaller than most records: most are split
    monkeypatch.setattr(sources, "MAP_WINDOW", 97)
    assert read_all(path)[1] == expected and len(expected) > 10
    monkeypatch.setattr(sources, "READ_CHUNK", 1 << 20)
    monkeypatch.setattr(sources, "MAP_WINDOW", 1 << 20)
    monkeypatch.setattr(sources, "BATCH_FRAMES", 3)
    batches, frames = read_all(path)
    assert frames == expected
    assert all(1 <= len(batch) <= 3 for batch in batches) and len(batches) >= len(expected) / 3
    assert all(batch.timestamps is None for batch in batches)  # only paced replays need them


def test_a_batch_reads_its_frames_in_place_in_the_mapped_file():
    (batch, *_), _ = read_all(CORPUS / "mptcp-v0.pcap")
    start, end, wire_length = spans_of(batch)[1]
    data = (CORPUS / "mptcp-v0.pcap").read_bytes()
    assert isinstance(batch.buffer, mmap.mmap)  # the window begins at the start of the file
    assert batch.buffer[start:end] == data[start:end]
    assert struct.unpack_from("<I", data, start - 4)[0] == wire_length


def test_a_pcapng_batch_reads_its_frames_in_place_in_the_file():
    path = CORPUS / "ahcp.pcapng"
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


def test_frames_before_a_corrupt_pcap_record_count(tmp_path):
    path = tmp_path / "corrupt.pcap"
    wrpcap(str(path), [Ether(**MACS) / IP() / UDP() for _ in range(3)])
    with open(path, "ab") as file:
        file.write(struct.pack("<IIII", 0, 0, sources.MAX_RECORD + 1, 60) + bytes(60))
    delivered = []
    with pytest.raises(SourceError, match=f"^{path}: corrupt record at byte {path.stat().st_size - 76}$"):
        for batch in PcapSource(str(path)).batches(threading.Event()):
            delivered += frames_of(batch)
    assert len(delivered) == 3


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


def udp_frames(count: int) -> list:
    """Real frames for end-to-end counting: clients 192.0.2.2.. and 2001:db8::2.. of server .1 / ::1."""
    frames = []
    for index in range(count):
        if index % 3:
            network = IP(src=f"192.0.2.{2 + index % 5}", dst="192.0.2.1")
        else:
            network = IPv6(src=f"2001:db8::{2 + index % 4}", dst="2001:db8::1")
        frames.append(Ether(**MACS) / network / UDP(sport=40000 + index, dport=53) / bytes(index % 90))
    return frames


def summarize(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", "summarize", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_summarize_counts_simple_packet_blocks_as_the_same_frames_in_a_classic_pcap(tmp_path):
    frames = udp_frames(40)
    for index, frame in enumerate(frames):
        frame.time = 1_700_000_000 + index
    wrpcap(str(tmp_path / "same.pcap"), frames)  # Scapy's writer: the reference file
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
               for name in (path, tmp_path / "same.pcap")]
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


def paced_file(tmp_path: pathlib.Path, gaps: list[float]) -> pathlib.Path:
    packets = [Ether(**MACS) / IP(src="192.0.2.2", dst="192.0.2.1") / UDP() for _ in range(len(gaps) + 1)]
    for index, packet in enumerate(packets):
        packet.time = 1_700_000_000 + sum(gaps[:index])
    path = tmp_path / "paced.pcap"
    wrpcap(str(path), packets)
    return path


def arrival_times(source: PcapSource, seconds: float) -> list[float]:
    """When each frame came out of ``source``, over ``seconds`` (the replay is stopped then)."""
    stop = threading.Event()
    arrivals: list[float] = []
    started = time.monotonic()

    def consume():
        for batch in source.batches(stop):
            arrivals.extend([time.monotonic() - started] * len(batch))

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        consumer.join(seconds)
    finally:
        stop.set()
        consumer.join(5)
    assert not consumer.is_alive()
    return arrivals


def test_realtime_replay_releases_frames_at_their_recorded_pace(tmp_path):
    path = paced_file(tmp_path, [0.2] * 3)
    arrivals = arrival_times(PcapSource(str(path), realtime=True), 2)
    assert len(arrivals) == 4
    for index, arrival in enumerate(arrivals):
        assert index * 0.2 - 0.02 <= arrival < index * 0.2 + 0.15


def test_a_realtime_loop_keeps_the_recorded_rate_across_passes(tmp_path):
    # Span 0.6 s, mean gap 0.2 s: a pass every 0.8 s, frames 0.2 s apart, seams included.
    path = paced_file(tmp_path, [0.1, 0.3, 0.2])
    arrivals = arrival_times(PcapSource(str(path), realtime=True, loop=True), 2.3)
    expected = [0, 0.1, 0.4, 0.6, 0.8, 0.9, 1.2, 1.4, 1.6, 1.7, 2.0, 2.2]
    assert len(arrivals) == len(expected)
    for arrival, due in zip(arrivals, expected):
        assert due - 0.02 <= arrival < due + 0.15


def test_a_realtime_loop_over_one_frame_replays_it_once_a_second(tmp_path):
    path = paced_file(tmp_path, [])
    arrivals = arrival_times(PcapSource(str(path), realtime=True, loop=True), 2.5)
    assert len(arrivals) == 3
    for index, arrival in enumerate(arrivals):
        assert index - 0.02 <= arrival < index + 0.15


def test_paced_simple_packets_go_with_the_frame_before_them(tmp_path):
    file = Pcapng()
    file.section()
    file.interface(LINKTYPE_ETHERNET)
    file.simple(bytes(60))  # before any timestamp: at the start
    file.enhanced(0, 1_700_000_000 * 10**6, bytes(60))
    file.enhanced(0, 1_700_000_000 * 10**6 + 300_000, bytes(60))
    file.simple(bytes(60))
    path = file.write(tmp_path / "simple.pcapng")
    arrivals = arrival_times(PcapSource(str(path), realtime=True), 1)
    assert len(arrivals) == 4
    assert max(arrivals[:2]) < 0.1 and 0.28 <= arrivals[2] <= arrivals[3] < 0.4


@pytest.mark.parametrize("realtime", [False, True], ids=["max", "realtime"])
@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_an_empty_file_ends_the_replay_at_once_with_one_warning_even_in_a_loop(tmp_path, caplog, kind, realtime):
    if kind == "pcap":
        path = tmp_path / "empty.pcap"
        path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET))
    else:
        file = Pcapng()
        file.section()
        file.interface(LINKTYPE_ETHERNET)
        path = file.write(tmp_path / "empty.pcapng")
    source = PcapSource(str(path), realtime=realtime, loop=True)
    with caplog.at_level(logging.WARNING):
        started = time.monotonic()
        assert arrival_times(source, 3) == [] and time.monotonic() - started < 1
        assert arrival_times(source, 3) == []  # once more: no second warning
    assert [record.getMessage() for record in caplog.records] == [f"{path} holds no frames"]


def test_batch_of_and_part_keep_frames_and_their_order():
    frames = [Frame(60 + index, bytes([index]) * (10 + index)) for index in range(5)]
    batch = FrameBatch.of(1, frames)
    assert frames_of(batch) == frames and len(batch) == 5
    assert frames_of(batch.part(1, 3)) == frames[1:3]
    assert not FrameBatch.of(1, [])
