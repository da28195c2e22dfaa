"""Capture files for the reader tests: pcapng written byte by byte, and what Scapy and tshark read of a file."""
import json
import pathlib
import random
import shutil
import struct
import subprocess
import threading
import time
from typing import Optional

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import RawPcapNgReader, RawPcapReader, wrpcap

from exporter.decode import LINKTYPE_ETHERNET, LINKTYPE_IPV4, LINKTYPE_RAW
from exporter.frames import FrameBatch
from exporter import replay
from exporter.replay import PcapSource
from tests.builders import CORPUS_PCAPS, Frame, MACS, frames_of, timestamps_of

CORPUS_PCAPNG = sorted(CORPUS_PCAPS.glob("*.pcapng"))

# pcapng block types and options, as the spec (draft-ietf-opsawg-pcapng) numbers them
SECTION_HEADER, INTERFACE, OBSOLETE_PACKET, SIMPLE_PACKET = 0x0A0D0D0A, 1, 2, 3

NAME_RESOLUTION, INTERFACE_STATISTICS, ENHANCED_PACKET, CUSTOM = 4, 5, 6, 0x00000BAD

OPT_END, OPT_COMMENT, IF_NAME, IF_TSRESOL, IF_TSOFFSET, EPB_FLAGS = 0, 1, 2, 9, 14, 2


def pcap_header(link_type: int) -> bytes:
    """A classic pcap file header: little-endian, microseconds, version 2.4, snaplen 65535."""
    return struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, link_type)


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
        batches = list(replay._read_frames(file, str(path), timestamps=True))
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
