"""Pcap sources: every record read in place, across chunk and batch boundaries, as Scapy reads it."""
import pathlib
import struct
import threading
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import RawPcapNgReader, RawPcapReader, wrpcap

from exporter import sources
from exporter.sources import Frame, FrameBatch, PcapSource

CORPUS = pathlib.Path(__file__).parent / "data" / "corpus" / "pcaps"


def scapy_records(path: pathlib.Path) -> list[tuple[float, Frame]]:
    """The oracle: (timestamp, frame) of every record as Scapy's raw readers see them."""
    reader_type = RawPcapNgReader if path.suffix == ".pcapng" else RawPcapReader
    records = []
    with reader_type(str(path)) as reader:
        for data, meta in reader:
            if path.suffix == ".pcapng":
                timestamp, wire_length = ((meta.tshigh << 32) + meta.tslow) / meta.tsresol, meta.wirelen
            else:
                timestamp, wire_length = meta.sec + meta.usec / (1e9 if reader.nano else 1e6), meta.wirelen
            records.append((timestamp, Frame(wire_length or len(data), data)))
    return records


def read_all(path: pathlib.Path, **options) -> tuple[list[FrameBatch], list[Frame]]:
    batches = list(PcapSource(str(path), **options).batches(threading.Event()))
    return batches, [frame for batch in batches for frame in batch.frames()]


@pytest.mark.parametrize("name", ["mptcp-v0.pcap", "tcp-handshake-nano.pcap", "802.1ad_QinQ.pcap",
                                  "ahcp.pcapng", "nfs-write-verf-cookie.pcapng"])
def test_frames_and_timestamps_equal_scapys_records(name):
    path = CORPUS / name
    with open(path, "rb") as file:  # the reader a paced replay uses, without the pacing
        batches = list(sources._read_frames(file, str(path), timestamps=True))
    frames = [frame for batch in batches for frame in batch.frames()]
    expected = scapy_records(path)
    assert frames == [frame for _, frame in expected]
    timestamps = [t for batch in batches for t in batch.timestamps]
    assert timestamps == pytest.approx([t for t, _ in expected], abs=1e-6)


def test_records_split_across_chunks_and_batches_are_read_whole(monkeypatch):
    path = CORPUS / "mptcp-v0.pcap"
    _, expected = read_all(path)
    monkeypatch.setattr(sources, "READ_CHUNK", 97)  # smaller than most records: most are split
    assert read_all(path)[1] == expected and len(expected) > 10
    monkeypatch.setattr(sources, "READ_CHUNK", 1 << 20)
    monkeypatch.setattr(sources, "BATCH_FRAMES", 3)
    batches, frames = read_all(path)
    assert frames == expected
    assert [len(batch) for batch in batches[:-1]] == [3] * (len(batches) - 1) and 1 <= len(batches[-1]) <= 3
    assert all(batch.timestamps is None for batch in batches)  # only paced replays need them


def test_a_batch_reads_its_frames_in_place_in_the_file_chunk():
    (batch, *_), _ = read_all(CORPUS / "mptcp-v0.pcap")
    start, end, wire_length = batch.spans[1]
    data = (CORPUS / "mptcp-v0.pcap").read_bytes()
    assert batch.buffer[start:end] == data[start + 24:end + 24]  # the chunk begins after the file header
    assert struct.unpack_from("<I", data, start + 24 - 4)[0] == wire_length


def test_realtime_replay_releases_frames_at_their_recorded_pace(tmp_path):
    packets = [Ether() / IP(src="192.0.2.2", dst="192.0.2.1") / UDP() for _ in range(4)]
    for index, packet in enumerate(packets):
        packet.time = 1_700_000_000 + index * 0.2
    path = tmp_path / "paced.pcap"
    wrpcap(str(path), packets)
    started = time.monotonic()
    arrivals = []
    for batch in PcapSource(str(path), realtime=True).batches(threading.Event()):
        arrivals += [time.monotonic() - started] * len(batch)
    assert len(arrivals) == 4
    for index, arrival in enumerate(arrivals):
        assert index * 0.2 - 0.02 <= arrival < index * 0.2 + 0.15


def test_batch_of_and_part_keep_frames_and_their_order():
    frames = [Frame(60 + index, bytes([index]) * (10 + index)) for index in range(5)]
    batch = FrameBatch.of(1, frames)
    assert list(batch.frames()) == frames and len(batch) == 5
    assert list(batch.part(1, 3).frames()) == frames[1:3]
    assert not FrameBatch.of(1, [])
