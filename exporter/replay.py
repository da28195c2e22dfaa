"""Replaying a capture (pcap or pcapng): a file as fast as possible or at its recorded pace, once or in a loop;
or a stream on standard input (``-``) as it arrives."""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import select
import stat
import threading
import time
from typing import BinaryIO, Iterator, Optional

from .frames import FrameBatch, SourceError
from .pcap import NO_LINK_TYPE, PCAP_MAGICS, read_pcap, read_pcap_stream
from .pcapng import PCAPNG_MAGIC, file_chunks, read_pcapng

log = logging.getLogger(__name__)

# A loop over a file without a time span (one frame, or one timestamp) replays it once a second.
LOOP_PERIOD_WITHOUT_SPAN_SECONDS = 1.0

STDIN = "-"  # the name that means the stream on standard input

# A stream that sends nothing for this long yields an empty batch: housekeeping, and a look at `stop`.
STREAM_IDLE_SECONDS = 0.5

STREAM_READ = 1 << 20  # bytes asked of one read of a stream

STREAM_GATHER = 1 << 24  # bytes of a stream gathered at most into one chunk, while more is there at once

PIPE_BYTES = 1 << 20  # a pipe on standard input is grown to this: fewer, larger reads of a fast stream


class PcapSource:
    """Replay a pcap or pcapng file, as fast as possible or at its recorded pace, once or in a loop;
    or, named ``-``, the stream on standard input (``stream_fd``), as it arrives and once.

    A file without frames ends the replay, loop or not, with a warning. With ``capture_filter``
    (BPF), libpcap reads the file and keeps what the filter keeps, as in a live capture.
    """

    kind = "pcap"
    restartable = False  # read again, the file would be counted twice

    def __init__(self, path: str, *, realtime: bool = False, loop: bool = False, stream_fd: int = 0,
                 capture_filter: str = "", timestamps: bool = False):
        self.name = path
        self.realtime = realtime
        self.timestamps = timestamps or realtime  # batches carry them: for pacing, or for TCP health
        self.loop = loop
        self.capture_filter = capture_filter
        self.stream = path == STDIN
        self.size: Optional[int] = None  # of the file, in bytes; None for a stream
        self._stream_fd = stream_fd
        self._streamed: Optional[int] = None  # bytes read from the stream; None before it is read
        self._tell = lambda: 0
        self._warned_empty = False
        if self.stream:
            _prepare_stream(stream_fd, path)
        else:
            with self._open() as file:  # fail at start-up, not in the capture thread, on a missing or foreign file
                self.size = os.fstat(file.fileno()).st_size
            if capture_filter:
                from .libpcap import check_filter

                check_filter(path, capture_filter)  # FilterError with libpcap's message

    def kernel_dropped(self) -> int:
        return 0

    def bytes_read(self) -> int:
        """How far into its file or stream the replay has read."""
        return self._tell()

    def batches(self, stop: threading.Event) -> Iterator[FrameBatch]:
        """Every frame of the file, once or pass after pass until ``stop``; paced if realtime.

        From a stream: its frames as they arrive, and an empty batch whenever it idles, until it ends.
        """
        pace = _Pace(stop) if self.realtime else None
        while True:
            frames = 0
            with self._reading() as batches:
                if pace is not None:
                    batches = pace.release(batches)
                for batch in batches:
                    if stop.is_set():
                        return
                    frames += len(batch)
                    yield batch
            if not frames:
                if not self._warned_empty:
                    self._warned_empty = True
                    log.warning("%s holds no frames", self.name)
                return
            if not self.loop or stop.is_set():
                return

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Iterator[FrameBatch]]:
        """The batches of one pass over the input."""
        if self.stream:
            if self._streamed is not None:
                raise SourceError(f"{self.name}: a stream can be read only once")
            self._streamed = 0
            self._tell = lambda: self._streamed
            yield _read_stream(self._stream_chunks(), self.name, timestamps=self.timestamps)
            return
        if self.capture_filter:
            from .libpcap import read_filtered

            yield read_filtered(self.name, self.capture_filter, timestamps=self.timestamps)
            return
        with self._open() as file:
            self._tell = file.tell
            try:
                yield _read_frames(file, self.name, timestamps=self.timestamps)
            finally:
                self._tell = lambda: self.size

    def _stream_chunks(self) -> Iterator[Optional[bytes]]:
        """What the stream has for us at each read, or None after STREAM_IDLE_SECONDS without; until it ends."""
        poller = select.poll()
        poller.register(self._stream_fd, select.POLLIN)
        idle_ms = int(STREAM_IDLE_SECONDS * 1000)
        while True:
            if not poller.poll(idle_ms):
                yield None
                continue
            # What is there now, up to STREAM_GATHER bytes: larger batches count faster, and nothing waits.
            parts, size, ended = [], 0, False
            while size < STREAM_GATHER and (not parts or poller.poll(0)):
                try:
                    part = os.read(self._stream_fd, STREAM_READ)
                except OSError as error:
                    raise SourceError(f"{self.name}: cannot read standard input: {error.strerror}") from None
                if not part:
                    ended = True
                    break
                parts.append(part)
                size += len(part)
            if parts:
                self._streamed += size
                yield parts[0] if len(parts) == 1 else b"".join(parts)
            if ended:
                return

    def _open(self):
        try:
            file = open(self.name, "rb")
        except OSError as error:
            raise SourceError(f"cannot open {self.name}: {error.strerror}") from None
        magic = file.read(4)
        file.seek(0)
        if magic not in PCAP_MAGICS and magic != PCAPNG_MAGIC:
            file.close()
            raise SourceError(f"{self.name}: not a pcap or pcapng file")
        return file


def _read_frames(file: BinaryIO, path: str, timestamps: bool) -> Iterator[FrameBatch]:
    if file.read(4) == PCAPNG_MAGIC:
        file.seek(0)
        return read_pcapng(file_chunks(file), path, timestamps)
    file.seek(0)
    return read_pcap(file, path, timestamps)


def _read_stream(chunks: Iterator[Optional[bytes]], name: str, timestamps: bool) -> Iterator[FrameBatch]:
    """The frames of a pcap or pcapng stream as they arrive, told apart by its first bytes."""
    head = b""
    for chunk in chunks:
        if chunk is None:
            yield FrameBatch.empty(NO_LINK_TYPE)
            continue
        head += chunk
        if len(head) >= 4:
            break
    if not head:
        raise SourceError(f"{name}: empty stream (it ended before anything arrived)")
    chunks = itertools.chain([head], chunks)
    if head[:4] == PCAPNG_MAGIC:
        yield from read_pcapng(chunks, name, timestamps, stream=True)
    elif head[:4] in PCAP_MAGICS:
        yield from read_pcap_stream(chunks, name, timestamps)
    else:
        raise SourceError(f"{name}: not a pcap or pcapng stream (write one with tcpdump -U -w - or dumpcap -w -)")


def _prepare_stream(fd: int, name: str) -> None:
    """Refuse a terminal (nothing was piped in) and grow a pipe, at start-up."""
    if not hasattr(select, "poll"):  # Windows
        raise SourceError(f"{name}: reading a stream from standard input needs poll(2), which this system lacks")
    try:
        mode = os.fstat(fd).st_mode
    except OSError as error:
        raise SourceError(f"{name}: cannot read standard input: {error.strerror}") from None
    if os.isatty(fd):
        raise SourceError(f"{name}: standard input is a terminal; pipe a capture into it, "
                          f"e.g. tcpdump -U -w - | traffic-exporter --pcap -")
    if stat.S_ISFIFO(mode):
        with contextlib.suppress(ImportError, AttributeError, OSError):  # only faster, and only on Linux
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


class _Pace:
    """Releases frames at their recorded pace, pass after pass of a loop.

    A pass's first timestamp is due at its start; frames without a timestamp go with the frame before
    them. The next pass starts one period after this one: the pass's span plus the mean gap between
    its frames, so that a loop keeps the file's recorded rate, seams included (a pass without span,
    one frame or one timestamp, lasts LOOP_PERIOD_WITHOUT_SPAN_SECONDS).
    """

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.start = time.monotonic()

    def release(self, batches: Iterator[FrameBatch]) -> Iterator[FrameBatch]:
        """The frames of one pass, each batch cut where a frame must wait for its time."""
        start = due = self.start
        first = latest = None
        timed = 0
        for batch in batches:
            begin = 0
            for index, timestamp in enumerate(batch.timestamps.tolist()):
                if not math.isnan(timestamp):
                    if first is None:
                        first = latest = timestamp
                    elif timestamp > latest:
                        latest = timestamp
                    timed += 1
                    due = start + (timestamp - first)
                delay = due - time.monotonic()
                if delay > 0:
                    if index > begin:
                        yield batch.part(begin, index)
                        begin = index
                    if self.stop.wait(delay):
                        return
            if begin < len(batch):
                yield batch.part(begin, len(batch))
        span = 0.0 if first is None else latest - first
        self.start += (span + span / (timed - 1)) if span > 0 else LOOP_PERIOD_WITHOUT_SPAN_SECONDS
