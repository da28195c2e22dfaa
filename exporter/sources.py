"""Frame sources: pcap/pcapng replay (live capture joins the same interface).

A source yields ``FrameBatch``es: frames located in a shared buffer; an empty batch means
"nothing arrived for a while" so the consumer can do housekeeping.
"""
from __future__ import annotations

import logging
import math
import mmap
import os
import struct
import threading
import time
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Protocol, Sequence

import numpy as np

from .decode import supported_link_types
from .walk import pcap_records

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 24
MAP_WINDOW = 1 << 26  # bytes of a pcap file mapped at a time
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
# Frames per batch: large batches amortize the per-flow work; the cap bounds the memory a batch of
# distinct flows (an address flood) takes.
BATCH_FRAMES = 32768
MAX_RECORD = 1 << 28  # no sane capture record or block is larger; beyond it the file is corrupt
# magic -> (byte order, timestamp fraction units per second)
PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e6), b"\xa1\xb2\xc3\xd4": (">", 1e6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e9), b"\xa1\xb2\x3c\x4d": (">", 1e9),
}
# pcapng (draft-ietf-opsawg-pcapng): block types, byte-order magic, interface options
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"  # the section header block's type, the same in both byte orders
BLOCK_SECTION_HEADER = 0x0A0D0D0A
BLOCK_INTERFACE = 1
BLOCK_OBSOLETE_PACKET = 2
BLOCK_SIMPLE_PACKET = 3
BLOCK_ENHANCED_PACKET = 6
PCAPNG_BYTE_ORDERS = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}
PCAPNG_VERSIONS = {(1, 0), (1, 2)}  # 1.2: written by old tools for 1.0 files (libpcap reads both)
OPTION_END = 0
IF_TSRESOL = 9
IF_TSOFFSET = 14
# A loop over a file without a time span (one frame, or one timestamp) replays it once a second.
LOOP_PERIOD_WITHOUT_SPAN_SECONDS = 1.0


class Frame(NamedTuple):
    """One frame, copied: its length on the wire and its captured bytes (the hot path uses ``FrameBatch``)."""

    wire_length: int
    data: bytes


class FrameBatch:
    """Frames of one link type, read in place from one buffer: no copy and no object per frame.

    Frame ``i`` is ``buffer[starts[i]:ends[i]]`` as captured; ``wire_lengths[i]`` is its length on
    the wire, which can exceed what was captured. ``timestamps`` (seconds; NaN for a frame recorded
    without one) is filled only by sources asked for it. The arrays are numpy int64 (float64).
    An empty batch means "nothing arrived for a while", so the consumer can do housekeeping.
    """

    __slots__ = ("link_type", "buffer", "starts", "ends", "wire_lengths", "timestamps")

    def __init__(self, link_type: int, buffer, starts: np.ndarray, ends: np.ndarray, wire_lengths: np.ndarray,
                 timestamps: Optional[np.ndarray] = None):
        self.link_type = link_type
        self.buffer = buffer
        self.starts, self.ends, self.wire_lengths = starts, ends, wire_lengths
        self.timestamps = timestamps

    @classmethod
    def from_spans(cls, link_type: int, buffer, spans: Sequence[tuple[int, int, int]],
                   timestamps: Optional[Sequence[Optional[float]]] = None) -> "FrameBatch":
        """A batch of the frames ``(start, end, wire_length)`` of ``buffer``."""
        located = np.array(spans, np.int64).reshape(-1, 3)
        return cls(link_type, buffer, located[:, 0], located[:, 1], located[:, 2],
                   None if timestamps is None else np.array([np.nan if t is None else t for t in timestamps]))

    @classmethod
    def of(cls, link_type: int, frames: Iterable[Frame]) -> "FrameBatch":
        """A batch holding copies of ``frames``."""
        pieces, spans, position = [], [], 0
        for wire_length, data in frames:
            pieces.append(data)
            spans.append((position, position + len(data), wire_length))
            position += len(data)
        return cls.from_spans(link_type, b"".join(pieces), spans)

    @classmethod
    def empty(cls, link_type: int) -> "FrameBatch":
        """No frame: nothing arrived for a while."""
        nothing = np.zeros(0, np.int64)
        return cls(link_type, b"", nothing, nothing, nothing)

    def __len__(self) -> int:
        return len(self.starts)

    def part(self, begin: int, end: int) -> "FrameBatch":
        """Frames ``begin`` to ``end`` of this batch, sharing its buffer."""
        return FrameBatch(self.link_type, self.buffer, self.starts[begin:end], self.ends[begin:end],
                          self.wire_lengths[begin:end], None if self.timestamps is None else self.timestamps[begin:end])


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
    """Replay a pcap or pcapng file, as fast as possible or at its recorded pace, once or in a loop.

    A file without frames ends the replay, loop or not, with a warning.
    """

    kind = "pcap"

    def __init__(self, path: str, *, realtime: bool = False, loop: bool = False):
        self.name = path
        self.realtime = realtime
        self.loop = loop
        self._warned_empty = False
        self._open().close()  # fail at start-up, not in the capture thread, on a missing or foreign file

    def kernel_dropped(self) -> int:
        return 0

    def batches(self, stop: threading.Event) -> Iterator[FrameBatch]:
        """Every frame of the file, once or pass after pass until ``stop``; paced if realtime."""
        pace = _Pace(stop) if self.realtime else None
        while True:
            frames = 0
            with self._open() as file:
                batches = _read_frames(file, self.name, timestamps=self.realtime)
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
    """Walk a classic pcap file through memory-mapped windows, noting where each frame lies: no copy.

    A window is mapped with its pages read in at once (MAP_POPULATE: one fault per page would cost
    more than the counting) and dropped when the walk has left it, so memory stays bounded.
    """
    header = file.read(24)
    if len(header) < 24:
        raise SourceError(f"{path}: truncated pcap header")
    order, units = PCAP_MAGICS[header[:4]]
    link_type = struct.unpack(order + "I", header[20:24])[0] & 0x0FFFFFFF  # upper bits: FCS info
    check_link_type(link_type, path)
    size = os.fstat(file.fileno()).st_size
    fields = np.dtype(order + "u4")
    captured_at = struct.Struct(order + "I").unpack_from
    position = 24  # in the file: where the next record starts
    while size - position >= 16:
        base = position - position % mmap.ALLOCATIONGRANULARITY
        window = _map(file, base, min(size, position + MAP_WINDOW))
        captured = captured_at(window, position - base + 8)[0]
        if captured <= MAX_RECORD and base + len(window) < min(size, position + 16 + captured):
            window = _map(file, base, min(size, position + 16 + captured))  # a record larger than the window
        words = np.ndarray((len(window) - 3,), fields, window, 0, (1,))
        at = position - base
        while True:
            offsets, at, corrupt = pcap_records(window, at, order, BATCH_FRAMES, MAX_RECORD)
            if len(offsets):
                starts = offsets + 16
                captured, wire = words[offsets + 8].astype(np.int64), words[offsets + 12].astype(np.int64)
                stamps = words[offsets] + words[offsets + 4] / units if timestamps else None
                yield FrameBatch(link_type, window, starts, starts + captured, np.where(wire > 0, wire, captured),
                                 stamps)
            if corrupt:
                raise SourceError(f"{path}: corrupt record at byte {base + at}")
            if len(offsets) < BATCH_FRAMES:
                break
        if base + at == position:  # not one whole record in the window: the file ends inside it
            break
        position = base + at
    if position != size:
        raise SourceError(f"{path}: truncated file (last record incomplete)")


def _map(file, start: int, end: int) -> mmap.mmap:
    """Bytes ``start`` (a multiple of the allocation granularity) to ``end`` of a file, read in at once."""
    return mmap.mmap(file.fileno(), end - start, offset=start, flags=mmap.MAP_SHARED | MAP_POPULATE,
                     prot=mmap.PROT_READ)


def _read_pcapng(file, path: str, timestamps: bool) -> Iterator[FrameBatch]:
    """Walk a pcapng file block by block in large chunks, noting where each frame lies: no copy per frame.

    Each section has its own byte order and interfaces; each packet block refers to an interface
    its section described before it. Other blocks (statistics, names, custom...) are skipped.
    A simple packet block has no timestamp: its timestamp is None.
    """
    buffer = b""
    base = 0  # the file offset of buffer[0], for error messages
    position = 0
    order = "<"  # until the section header says otherwise
    head, word, enhanced, obsolete = _pcapng_structs(order)
    interfaces: list[_Interface] = []
    checked: set[int] = set()  # link types known to be supported
    link_type = -1
    spans: list[tuple[int, int, int]] = []
    times: list[Optional[float]] = []

    def corrupt(problem: str) -> SourceError:
        return SourceError(f"{path}: corrupt pcapng block at byte {base + position}: {problem}")

    try:
        while True:
            chunk = file.read(READ_CHUNK)
            if not chunk:
                break
            buffer = buffer[position:] + chunk
            base += position
            position = 0
            end = len(buffer)
            while position + 12 <= end:
                block_type, length = head(buffer, position)
                if block_type == BLOCK_SECTION_HEADER:
                    order = _section_byte_order(buffer, position, corrupt)
                    head, word, enhanced, obsolete = _pcapng_structs(order)
                    length = word(buffer, position + 4)[0]
                if length & 3 or length < 12 or length > MAX_RECORD:
                    raise corrupt(f"block length {length} (a multiple of 4 from 12 to {MAX_RECORD} expected)")
                following = position + length
                if following > end:
                    break  # the block goes on in the next chunk
                trailing = word(buffer, following - 4)[0]
                if trailing != length:
                    raise corrupt(f"trailing block length {trailing} differs from the leading {length}")
                if block_type == BLOCK_ENHANCED_PACKET:
                    if length < 32:
                        raise corrupt(f"packet block length {length} is below 32")
                    interface_id, high, low, captured, wire_length = enhanced(buffer, position + 8)
                    if captured > length - 32:
                        raise corrupt(f"captured length {captured} goes beyond the block")
                    start = position + 28
                elif block_type == BLOCK_SIMPLE_PACKET:
                    if length < 16:
                        raise corrupt(f"simple packet block length {length} is below 16")
                    if not interfaces:
                        raise corrupt("simple packet block before any interface description in its section")
                    interface_id, high = 0, None
                    wire_length = word(buffer, position + 8)[0]
                    # No captured length here; the spec's rule: the original length, cut by interface 0's
                    # snaplen (0: none) and by the room in the block.
                    captured = min(wire_length, length - 16, interfaces[0].snaplen or length)
                    start = position + 12
                elif block_type == BLOCK_OBSOLETE_PACKET:
                    if length < 32:
                        raise corrupt(f"packet block length {length} is below 32")
                    interface_id, high, low, captured, wire_length = obsolete(buffer, position + 8)
                    if captured > length - 32:
                        raise corrupt(f"captured length {captured} goes beyond the block")
                    start = position + 28
                else:
                    if block_type == BLOCK_SECTION_HEADER:
                        _check_section_header(buffer, position, length, order, corrupt)
                        interfaces = []
                    elif block_type == BLOCK_INTERFACE:
                        interfaces.append(_interface(buffer, position, length, order, corrupt))
                    position = following
                    continue
                try:
                    interface = interfaces[interface_id]
                except IndexError:
                    raise corrupt(f"packet on interface {interface_id}, but its section describes "
                                  f"{len(interfaces)} interface(s) before it") from None
                if interface.link_type != link_type:  # a batch has one link type
                    if interface.link_type not in checked:
                        check_link_type(interface.link_type, path)
                        checked.add(interface.link_type)
                    if spans:
                        yield FrameBatch.from_spans(link_type, buffer, spans, times if timestamps else None)
                        spans, times = [], []
                    link_type = interface.link_type
                spans.append((start, start + captured, wire_length or captured))
                if timestamps:
                    times.append(None if high is None else ((high << 32) | low) / interface.units + interface.offset)
                position = following
                if len(spans) == BATCH_FRAMES:
                    yield FrameBatch.from_spans(link_type, buffer, spans, times if timestamps else None)
                    spans, times = [], []
            if spans:  # they locate frames in this buffer: hand them over before the next chunk
                yield FrameBatch.from_spans(link_type, buffer, spans, times if timestamps else None)
                spans, times = [], []
    except SourceError:
        if spans:  # the frames before the problem count
            yield FrameBatch.from_spans(link_type, buffer, spans, times if timestamps else None)
        raise
    if position != len(buffer):
        raise SourceError(f"{path}: truncated file (block at byte {base + position} incomplete)")


class _Interface(NamedTuple):
    """What a pcapng interface description says about the packets that refer to it."""

    link_type: int
    snaplen: int  # 0: no limit
    units: int  # timestamp units per second (if_tsresol)
    offset: int  # seconds added to every timestamp (if_tsoffset)


def _pcapng_structs(order: str) -> tuple[Callable, ...]:
    """Readers of a section's block head, 32-bit word, and enhanced and obsolete packet block fields."""
    return (struct.Struct(order + "II").unpack_from, struct.Struct(order + "I").unpack_from,
            struct.Struct(order + "IIIII").unpack_from,  # interface, timestamp high and low, captured, wire
            struct.Struct(order + "H2xIIII").unpack_from)  # the same after a 16-bit interface (and drops)


def _section_byte_order(buffer: bytes, position: int, corrupt: Callable[[str], SourceError]) -> str:
    magic = buffer[position + 8:position + 12]
    if magic not in PCAPNG_BYTE_ORDERS:
        raise corrupt(f"section header without the byte-order magic (found {magic.hex()})")
    return PCAPNG_BYTE_ORDERS[magic]


def _check_section_header(buffer: bytes, position: int, length: int, order: str,
                          corrupt: Callable[[str], SourceError]) -> None:
    if length < 28:
        raise corrupt(f"section header block length {length} is below 28")
    version = struct.unpack_from(order + "HH", buffer, position + 12)
    if version not in PCAPNG_VERSIONS:
        raise corrupt(f"unsupported pcapng version {version[0]}.{version[1]}")


def _interface(buffer: bytes, position: int, length: int, order: str,
               corrupt: Callable[[str], SourceError]) -> _Interface:
    """Read an interface description block: link type, snaplen and the timestamp options."""
    if length < 20:
        raise corrupt(f"interface description block length {length} is below 20")
    link_type, snaplen = struct.unpack_from(order + "H2xI", buffer, position + 8)
    units, offset = 10 ** 6, 0
    option = position + 16
    options_end = position + length - 4
    while option + 4 <= options_end:
        code, size = struct.unpack_from(order + "HH", buffer, option)
        value = option + 4
        if value + size > options_end:
            raise corrupt(f"option {code} of {size} bytes goes beyond the block")
        if code == OPTION_END:
            break
        if code == IF_TSRESOL:
            if size != 1:
                raise corrupt(f"if_tsresol option of {size} bytes (1 expected)")
            exponent = buffer[value]
            # Most significant bit set: a negative power of 2, else of 10.
            units = 2 ** (exponent & 0x7F) if exponent & 0x80 else 10 ** exponent
        elif code == IF_TSOFFSET:
            if size != 8:
                raise corrupt(f"if_tsoffset option of {size} bytes (8 expected)")
            offset = struct.unpack_from(order + "q", buffer, value)[0]
        option = value + size + (-size & 3)  # values are padded to 32 bits
    return _Interface(link_type, snaplen, units, offset)


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
