"""Classic pcap files read as Scapy reads them, in place in the mapped file, window by window."""
import mmap
import struct
import threading

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from exporter import pcap as pcap_module, pcapng as pcapng_module
from exporter.frames import MAX_RECORD, SourceError
from exporter.replay import PcapSource
from tests.builders import CORPUS_PCAPS, MACS, frames_of, spans_of
from tests.capture_files import CORPUS_PCAPNG, assert_same_records, many_sections, read_all, read_records, scapy_records


@pytest.mark.parametrize("name", ["mptcp-v0.pcap", "tcp-handshake-nano.pcap", "802.1ad_QinQ.pcap",
                                  *(path.name for path in CORPUS_PCAPNG)])
def test_frames_and_timestamps_equal_scapys_records(name):
    assert_same_records(read_records(CORPUS_PCAPS / name)[1], scapy_records(CORPUS_PCAPS / name))


@pytest.mark.parametrize("name", ["mptcp-v0.pcap", "sections.pcapng"])
def test_records_split_across_chunks_and_batches_are_read_whole(monkeypatch, tmp_path, name):
    path = many_sections(tmp_path)[0] if name.endswith(".pcapng") else CORPUS_PCAPS / name
    _, expected = read_all(path)
    monkeypatch.setattr(pcapng_module, "READ_CHUNK", 97)  # smaller than most records: most are split
    monkeypatch.setattr(pcap_module, "MAP_WINDOW", 97)
    assert read_all(path)[1] == expected and len(expected) > 10
    monkeypatch.setattr(pcapng_module, "READ_CHUNK", 1 << 20)
    monkeypatch.setattr(pcap_module, "MAP_WINDOW", 1 << 20)
    for module in (pcap_module, pcapng_module):
        monkeypatch.setattr(module, "BATCH_FRAMES", 3)
    batches, frames = read_all(path)
    assert frames == expected
    assert all(1 <= len(batch) <= 3 for batch in batches) and len(batches) >= len(expected) / 3
    assert all(batch.timestamps is None for batch in batches)  # only paced replays need them


def test_a_batch_reads_its_frames_in_place_in_the_mapped_file():
    (batch, *_), _ = read_all(CORPUS_PCAPS / "mptcp-v0.pcap")
    start, end, wire_length = spans_of(batch)[1]
    data = (CORPUS_PCAPS / "mptcp-v0.pcap").read_bytes()
    assert isinstance(batch.buffer, mmap.mmap)  # the window begins at the start of the file
    assert batch.buffer[start:end] == data[start:end]
    assert struct.unpack_from("<I", data, start - 4)[0] == wire_length


def test_frames_before_a_corrupt_pcap_record_count(write_pcap):
    path = write_pcap("corrupt.pcap", [Ether(**MACS) / IP() / UDP() for _ in range(3)])
    with open(path, "ab") as file:
        file.write(struct.pack("<IIII", 0, 0, MAX_RECORD + 1, 60) + bytes(60))
    delivered = []
    with pytest.raises(SourceError, match=f"^{path}: corrupt record at byte {path.stat().st_size - 76}$"):
        for batch in PcapSource(str(path)).batches(threading.Event()):
            delivered += frames_of(batch)
    assert len(delivered) == 3
