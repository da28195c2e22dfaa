"""Frame sources: pcap/pcapng replay (live capture joins the same interface).

A source yields ``FrameBatch``es: frames located in a shared buffer; an empty batch means
"nothing arrived for a while" so the consumer can do housekeeping.
"""
from __future__ import annotations

import os
import struct
import threading
import time
from typing import Iterable, Iterator, NamedTuple, Optional, Protocol

from .decode import supported_link_types

READ_CHUNK = 1 << 24
# Frames per batch: large batches amortize the per-flow work; the cap bounds the memory a batch of
# distinct flows (an address flood) takes.
BATCH_FRAMES = 32768
MAX_RECORD = 1 << 28  # no sane capture record is larger; beyond it the file is corrupt
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
# magic -> (byte order, timestamp fraction units per second)
PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e6), b"\xa1\xb2\xc3\xd4": (">", 1e6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e9), b"\xa1\xb2\x3c\x4d": (">", 1e9),
}


class Frame(NamedTuple):
    """One frame, copied: its length on the wire and its captured bytes (the hot path uses ``FrameBatch``)."""

    wire_length: int
    data: bytes


class FrameBatch:
    """Frames of one link type, read in place from one buffer: no copy and no object per frame.

    ``spans`` holds ``(start, end, wire_length)`` per frame: the captured bytes are
    ``buffer[start:end]``; ``wire_length`` is the frame's length on the wire, which can exceed
    what was captured. ``timestamps`` (seconds) is filled only by sources asked for it.
    An empty batch means "nothing arrived for a while", so the consumer can do housekeeping.
    """

    __slots__ = ("link_type", "buffer", "spans", "timestamps")

    def __init__(self, link_type: int, buffer: bytes, spans: list[tuple[int, int, int]],
                 timestamps: Optional[list[float]] = None):
        self.link_type = link_type
        self.buffer = buffer
        self.spans = spans
        self.timestamps = timestamps

    @classmethod
    def of(cls, link_type: int, frames: Iterable[Frame]) -> "FrameBatch":
        """A batch holding copies of ``frames``."""
        pieces, spans, position = [], [], 0
        for wire_length, data in frames:
            pieces.append(data)
            spans.append((position, position + len(data), wire_length))
            position += len(data)
        return cls(link_type, b"".join(pieces), spans)

    def __len__(self) -> int:
        return len(self.spans)

    def frames(self) -> Iterator[Frame]:
        """Each frame, copied out of the buffer (for tests and tools, not the hot path)."""
        for start, end, wire_length in self.spans:
            yield Frame(wire_length, bytes(self.buffer[start:end]))

    def part(self, begin: int, end: int) -> "FrameBatch":
        """Frames ``begin`` to ``end`` of this batch, sharing its buffer."""
        return FrameBatch(self.link_type, self.buffer, self.spans[begin:end],
                          None if self.timestamps is None else self.timestamps[begin:end])


class SourceError(Exception):
    """A source cannot be read; the message is meant for the operator."""


class Source(Protocol):
    kind: str  # "live" or "pcap"
    name: str  # interface name or file path

    def batches(self, stop: threading.Event) -> Iterator[FrameBatch]: ...

    def kernel_dropped(self) -> int: ...


def check_link_type(link_type: int, where: str) -> None:
    """Refuse a capture whose link type the decoder does not understand."""
    if link_type not in supported_link_types():
        supported = ", ".join(str(t) for t in sorted(supported_link_types()))
        raise SourceError(f"{where}: unsupported link type {link_type} (supported: {supported})")


class PcapSource:
    """Replay a pcap or pcapng file, as fast as possible or at its recorded pace, once or in a loop."""

    kind = "pcap"

    def __init__(self, path: str, *, realtime: bool = False, loop: bool = False):
        self.name = path
        self.realtime = realtime
        self.loop = loop
        self._open().close()  # fail at start-up, not in the capture thread, on a missing or foreign file

    def kernel_dropped(self) -> int:
        return 0

    def batches(self, stop: threading.Event) -> Iterator[FrameBatch]:
        while True:
            with self._open() as file:
                batches = _read_frames(file, self.name, timestamps=self.realtime)
                if self.realtime:
                    batches = _paced(batches, stop)
                for batch in batches:
                    if stop.is_set():
                        return
                    yield batch
            if not self.loop:
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


def _read_frames(file, path: str, timestamps: bool) -> Iterator[FrameBatch]:
    if file.read(4) == PCAPNG_MAGIC:
        file.seek(0)
        return _read_pcapng(file, path, timestamps)
    file.seek(0)
    return _read_pcap(file, path, timestamps)


def _read_pcap(file, path: str, timestamps: bool) -> Iterator[FrameBatch]:
    """Walk a classic pcap file in large chunks, noting where each frame lies: no copy per frame."""
    header = file.read(24)
    if len(header) < 24:
        raise SourceError(f"{path}: truncated pcap header")
    order, units = PCAP_MAGICS[header[:4]]
    link_type = struct.unpack(order + "I", header[20:24])[0] & 0x0FFFFFFF  # upper bits: FCS info
    check_link_type(link_type, path)
    lengths = struct.Struct(order + "8xII").unpack_from  # captured, on the wire
    times = struct.Struct(order + "II").unpack_from  # seconds, fraction
    buffer = b""
    position = 0
    while True:
        chunk = file.read(READ_CHUNK)
        if not chunk:
            break
        buffer = buffer[position:] + chunk
        position = 0
        end = len(buffer)
        more = True
        while more:
            spans: list[tuple[int, int, int]] = []
            append = spans.append
            for _ in range(BATCH_FRAMES):
                if position + 16 > end:
                    more = False
                    break
                captured, wire_length = lengths(buffer, position)
                start = position + 16
                stop = start + captured
                if stop > end:
                    if captured > MAX_RECORD:
                        raise SourceError(f"{path}: corrupt record at byte {file.tell() - end + position}")
                    more = False
                    break
                append((start, stop, wire_length or captured))
                position = stop
            if spans:
                batch = FrameBatch(link_type, buffer, spans)
                if timestamps:
                    batch.timestamps = [seconds + fraction / units
                                        for seconds, fraction in (times(buffer, start - 16) for start, _, _ in spans)]
                yield batch
    if position != len(buffer):
        raise SourceError(f"{path}: truncated file (last record incomplete)")


def _read_pcapng(file, path: str, timestamps: bool) -> Iterator[FrameBatch]:
    from scapy.error import Scapy_Exception
    from scapy.utils import RawPcapNgReader

    try:
        reader = RawPcapNgReader(file)
    except (Scapy_Exception, EOFError, struct.error, ValueError) as error:
        raise SourceError(f"{path}: corrupt pcapng file ({error})") from None
    checked: set[int] = set()
    link_type = None
    frames: list[Frame] = []
    times: list[float] = []
    packets = iter(reader)  # Scapy reads at most 64 KiB of a record: plenty for headers

    def batch() -> FrameBatch:
        made = FrameBatch.of(link_type, frames)
        made.timestamps = times if timestamps else None
        return made

    while True:
        try:
            data, meta = next(packets)
        except StopIteration:
            break
        except (Scapy_Exception, struct.error, ValueError, KeyError, IndexError) as error:
            raise SourceError(f"{path}: corrupt pcapng file ({error})") from None
        if meta.linktype not in checked:
            check_link_type(meta.linktype, path)
            checked.add(meta.linktype)
        if meta.linktype != link_type or len(frames) == BATCH_FRAMES:  # a batch has one link type
            if frames:
                yield batch()
            link_type, frames, times = meta.linktype, [], []
        frames.append(Frame(meta.wirelen or len(data), data))
        times.append(((meta.tshigh << 32) + meta.tslow) / meta.tsresol if meta.tsresol else 0.0)
    if file.tell() != os.fstat(file.fileno()).st_size:
        raise SourceError(f"{path}: truncated or corrupt pcapng block at byte {file.tell()}")
    if frames:
        yield batch()


def _paced(batches: Iterator[FrameBatch], stop: threading.Event) -> Iterator[FrameBatch]:
    """Release frames at the pace their timestamps were recorded."""
    started = time.monotonic()
    first = None
    for batch in batches:
        begin = 0
        for index, timestamp in enumerate(batch.timestamps):
            if first is None:
                first = timestamp
            delay = (timestamp - first) - (time.monotonic() - started)
            if delay > 0:
                if index > begin:
                    yield batch.part(begin, index)
                    begin = index
                if stop.wait(delay):
                    return
        if begin < len(batch):
            yield batch.part(begin, len(batch))
