"""A capture streamed to standard input (``-``): counted as it arrives, equal to the same capture read as a file,
and every broken stream is one line."""
from __future__ import annotations

import contextlib
import json
import os
import pty
import struct
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest

from exporter.decode import LINKTYPE_ETHERNET
from exporter.frames import MAX_RECORD, SourceError
from exporter.pcap import Arrivals
from exporter.replay import STREAM_IDLE_SECONDS, PcapSource
from tests.builders import CORPUS_PCAPS, Frame, LINKTYPE_USER0, expected_summary, frames_of, summarize
from tests.capture_files import ENHANCED_PACKET, Pcapng, many_sections, pcap_header, udp_frames

SERVERS = ("--server-ip", "192.0.2.1", "--server-ip", "2001:db8::1")  # those of udp_frames


def summarize_stream(data: bytes, *args: str) -> subprocess.CompletedProcess:
    """``summarize - ARGS`` with ``data`` on its standard input (a pipe)."""
    return subprocess.run([sys.executable, "-m", "exporter", "summarize", "-", *args], input=data,
                          capture_output=True, timeout=120)


def one_line_error(result: subprocess.CompletedProcess, code: int) -> str:
    stderr = result.stderr.decode() if isinstance(result.stderr, bytes) else result.stderr
    assert result.returncode == code, stderr
    assert not result.stdout
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("traffic-exporter: ")
    return stderr


def pcap_of(frames) -> tuple[bytes, list[int]]:
    """A classic pcap (little-endian, microseconds) of Scapy frames written with struct, and where each record ends."""
    data, ends = bytearray(pcap_header(LINKTYPE_ETHERNET)), []
    for index, frame in enumerate(map(bytes, frames)):
        data += struct.pack("<IIII", 1_700_000_000 + index, 0, len(frame), len(frame)) + frame
        ends.append(len(data))
    return bytes(data), ends


def pcapng_of(frames) -> tuple[Pcapng, list[int]]:
    """A pcapng of Scapy frames (enhanced packet blocks), and where each of those blocks ends."""
    file = Pcapng()
    file.section()
    file.interface(LINKTYPE_ETHERNET)
    starts = [file.enhanced(0, (1_700_000_000 + index) * 10**6, bytes(frame)) for index, frame in enumerate(frames)]
    return file, starts[1:] + [len(file.data)]


class StreamReader:
    """``PcapSource('-')`` on the read end of a real pipe, consumed on a thread; the frames it handed over."""

    def __init__(self):
        self.read_end, self.write_end = os.pipe()
        self.source = PcapSource("-", stream_fd=self.read_end)
        self.stop = threading.Event()
        self.frames: list[Frame] = []
        self.empty_batches = 0
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._consume)
        self.thread.start()

    def _consume(self) -> None:
        try:
            for batch in self.source.batches(self.stop):
                if len(batch):
                    self.frames += frames_of(batch)
                else:
                    self.empty_batches += 1
        except Exception as error:  # reported to the test
            self.error = error

    def write(self, data: bytes) -> None:
        os.write(self.write_end, data)

    def end(self) -> None:
        if self.write_end >= 0:
            os.close(self.write_end)
            self.write_end = -1

    def wait_for(self, frames: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.frames) < frames and self.error is None and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        self.end()
        self.thread.join(5)
        os.close(self.read_end)
        assert not self.thread.is_alive()


@contextlib.contextmanager
def stream_reader() -> Iterator[StreamReader]:
    reader = StreamReader()
    try:
        yield reader
    finally:
        reader.close()


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_a_stream_is_counted_as_it_arrives_in_pieces_cut_anywhere(kind):
    frames = udp_frames(60)
    if kind == "pcap":
        data, ends = pcap_of(frames)
    else:
        file, ends = pcapng_of(frames)
        data = bytes(file.data)
    # Pieces end inside the file header, inside record headers and inside frames, and at one record's end.
    cuts = [5, 30, ends[3] - 7, ends[3], ends[10] + 3, ends[30] + 20, len(data)]
    with stream_reader() as reader:
        written = 0
        for cut in cuts:
            reader.write(data[written:cut])
            written = cut
            whole = sum(1 for end in ends if end <= written)
            reader.wait_for(whole)
            time.sleep(0.05)  # time to hand over more than it should
            assert len(reader.frames) == whole and reader.error is None  # not held back, not read ahead
        reader.end()
        reader.thread.join(5)
        assert not reader.thread.is_alive() and reader.error is None  # the stream ended: a finished replay
    assert reader.frames == [Frame(len(bytes(frame)), bytes(frame)) for frame in frames]


def test_a_record_arriving_in_many_small_chunks_is_read_whole():
    record = struct.pack("<IIII", 0, 0, 100_000, 100_000) + bytes(range(256)) * 390 + bytes(160)
    chunks = [record[at:at + 97] for at in range(0, len(record), 97)]
    arrivals = Arrivals(iter(chunks))
    assert arrivals.fill(16) and len(arrivals.buffer) == 97  # what arrived, no more
    assert arrivals.fill(len(record)) and arrivals.buffer == record
    assert not arrivals.fill(len(record) + 1) and arrivals.ended


def test_an_idle_stream_yields_empty_batches_and_honours_stop():
    with stream_reader() as reader:
        time.sleep(3 * STREAM_IDLE_SECONDS + 0.2)
        assert reader.empty_batches >= 2 and not reader.frames  # housekeeping while nothing arrives
        reader.write(pcap_header(LINKTYPE_ETHERNET)[:10])  # and in the middle of a header
        time.sleep(2 * STREAM_IDLE_SECONDS + 0.2)
        assert reader.empty_batches >= 3
        stopped = time.monotonic()
        reader.stop.set()
        reader.thread.join(5)
        assert time.monotonic() - stopped < STREAM_IDLE_SECONDS + 0.5 and reader.error is None


def test_a_stream_is_read_only_once():
    with stream_reader() as reader:
        reader.write(pcap_of(udp_frames(3))[0])
        reader.end()
        reader.thread.join(5)
        with pytest.raises(SourceError, match="^-: a stream can be read only once$"):
            list(reader.source.batches(threading.Event()))


# Corpus captures (nanosecond pcap, pcapng with several interfaces...), a big-endian pcap, and pcapng
# sections of both byte orders: the stream's counts equal the file's.
STREAMED = ["afs.pcap", "tcp-handshake-nano.pcap", "802.1ad_QinQ.pcap", "LINKTYPE_RAW_ipv6.pcap", "loopback.pcap",
            "ahcp.pcapng", "icmp-length-zero.pcapng", "nfs-write-verf-cookie.pcapng"]


@pytest.mark.parametrize("name", STREAMED + ["big-endian.pcap", "sections.pcapng"])
def test_summarize_of_a_stream_equals_summarize_of_the_file(tmp_path, name):
    if name == "big-endian.pcap":
        path = tmp_path / name
        frames = [bytes(frame) for frame in udp_frames(30)]
        records = (struct.pack(">IIII", 1_700_000_000, index, len(frame), len(frame)) + frame
                   for index, frame in enumerate(frames))
        path.write_bytes(struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET) + b"".join(records))
        servers = SERVERS
    elif name == "sections.pcapng":
        path = many_sections(tmp_path)[0]
        servers = ("--server-ip", "0.0.0.0/1", "--server-ip", "::/1")  # random bytes: whatever parses as IP
    else:
        path = CORPUS_PCAPS / name
        servers = tuple(f"--server-ip={server}" for server in expected_summary(name)["servers"]) or SERVERS
    from_file = summarize(path, "--format", "json", *servers)
    from_stream = summarize_stream(path.read_bytes(), "--format", "json", *servers)
    assert from_file.returncode == 0 and from_stream.returncode == 0, from_stream.stderr
    assert json.loads(from_stream.stdout) == json.loads(from_file.stdout)
    counted = json.loads(from_stream.stdout)
    assert counted["packets"] + sum(counted["ignored"].values()) > 0


def test_summarize_of_a_large_stream_through_a_pipe_equals_the_file(tmp_path):
    path = tmp_path / "large.pcap"
    path.write_bytes(pcap_of([bytes(frame) for frame in udp_frames(3000)] * 40)[0])  # 120,000 frames, 14 MiB
    from_file = summarize(path, "--format", "json", *SERVERS)
    cat = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    try:
        from_stream = subprocess.run([sys.executable, "-m", "exporter", "summarize", "-", "--format", "json", *SERVERS],
                                     stdin=cat.stdout, capture_output=True, timeout=120)
    finally:
        cat.stdout.close()
        cat.wait(10)
    assert from_stream.returncode == 0, from_stream.stderr
    assert json.loads(from_stream.stdout) == json.loads(from_file.stdout)
    assert json.loads(from_stream.stdout)["packets"] == 120_000


def corrupt_pcap_record() -> tuple[bytes, str]:
    data = pcap_of(udp_frames(3))[0]
    return data + struct.pack("<IIII", 0, 0, MAX_RECORD + 1, 60) + bytes(60), f"-: corrupt record at byte {len(data)}"


def corrupt_pcapng_block() -> tuple[bytes, str]:
    file = pcapng_of(udp_frames(3))[0]
    offset = file.raw(struct.pack("<II", ENHANCED_PACKET, 0xFFFFFFF0) + bytes(40))
    return bytes(file.data), f"-: corrupt pcapng block at byte {offset}: block length 4294967280"


def cut_pcap() -> tuple[bytes, str]:
    data, ends = pcap_of(udp_frames(5))
    return data[:-9], f"-: truncated stream (it ended inside the record at byte {ends[-2]})"


def cut_pcapng() -> tuple[bytes, str]:
    file, ends = pcapng_of(udp_frames(5))
    return bytes(file.data[:-9]), f"-: truncated stream (block at byte {ends[-2]} incomplete)"


@pytest.mark.parametrize("broken", [
    lambda: (b"", "-: empty stream"),
    lambda: (b"hello, this is text and not a capture\n", "-: not a pcap or pcapng stream"),
    lambda: (pcap_header(LINKTYPE_ETHERNET)[:20], "-: truncated pcap header"),
    lambda: (pcap_header(LINKTYPE_USER0) + bytes(16), "-: unsupported link type 147"),
    cut_pcap, cut_pcapng, corrupt_pcap_record, corrupt_pcapng_block,
], ids=["empty", "text", "header-cut", "link-type", "pcap-cut", "pcapng-cut", "pcap-corrupt", "pcapng-corrupt"])
def test_a_broken_stream_is_one_line_and_exit_1(broken):
    data, needle = broken()
    assert needle in one_line_error(summarize_stream(data, *SERVERS), 1)


@pytest.mark.parametrize("args, needle", [
    (["summarize", "-"], "--server-ip: needed with summarize -"),
    (["--pcap", "-"], "--server-ip: needed with --pcap -"),
    (["--pcap", "-", "--loop", *SERVERS], "--loop: a stream (--pcap -) is read once"),
    (["--pcap", "-", "--replay-speed", "realtime", *SERVERS], "--replay-speed: a stream (--pcap -)"),
])
def test_what_a_stream_cannot_do_is_refused_with_one_line_naming_the_flag(args, needle):
    result = subprocess.run([sys.executable, "-m", "exporter", *args], input=b"", capture_output=True, timeout=60)
    assert needle in one_line_error(result, 2)


def test_a_terminal_on_standard_input_is_refused_with_one_line():
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run([sys.executable, "-m", "exporter", "summarize", "-", *SERVERS], stdin=terminal,
                                capture_output=True, text=True, timeout=60)
    finally:
        os.close(terminal)
        os.close(controller)
    assert "-: standard input is a terminal; pipe a capture into it" in one_line_error(result, 1)


def test_the_frames_before_a_corrupt_record_of_a_stream_count():
    data, problem = corrupt_pcap_record()
    with stream_reader() as reader:
        reader.write(data)
        reader.end()
        reader.thread.join(5)
    assert isinstance(reader.error, SourceError) and str(reader.error) == problem
    assert len(reader.frames) == 3
