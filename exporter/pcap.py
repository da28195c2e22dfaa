"""Classic pcap: files walked through memory-mapped windows, streams as their chunks arrive; no copy per frame."""
from __future__ import annotations

import mmap
import os
import struct
from typing import BinaryIO, Callable, Generator, Iterable, Iterator, NamedTuple, Optional

import numpy as np

from .frames import BATCH_FRAMES, MAX_RECORD, FrameBatch, SourceError, check_link_type
from .walk import pcap_records

MAP_WINDOW = 1 << 26  # bytes of a pcap file mapped at a time

MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)

# magic -> (byte order, timestamp fraction units per second)
PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e6), b"\xa1\xb2\xc3\xd4": (">", 1e6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e9), b"\xa1\xb2\x3c\x4d": (">", 1e9),
}

PCAP_HEADER = 24

RECORD_HEADER = 16

NO_LINK_TYPE = -1  # of the empty batches a stream yields before its header says which


class _Layout(NamedTuple):
    """What a pcap header says about the records after it."""

    link_type: int
    order: str  # struct byte order
    units: float  # timestamp fraction units per second
    fields: np.dtype  # a 32-bit word in the file's byte order
    word: Callable  # struct unpack_from of one such word
    timestamps: bool  # whether batches carry them


def read_pcap(file: BinaryIO, path: str, timestamps: bool) -> Iterator[FrameBatch]:
    """Walk a classic pcap file through memory-mapped windows, noting where each frame lies: no copy.

    A window is mapped with its pages read in at once (MAP_POPULATE: one fault per page would cost
    more than the counting) and dropped when the walk has left it, so memory stays bounded.
    """
    layout = _layout(file.read(PCAP_HEADER), path, timestamps)
    size = os.fstat(file.fileno()).st_size
    position = PCAP_HEADER  # in the file: where the next record starts
    while size - position >= RECORD_HEADER:
        base = position - position % mmap.ALLOCATIONGRANULARITY
        window = _map(file, base, min(size, position + MAP_WINDOW))
        captured = layout.word(window, position - base + 8)[0]
        end = min(size, position + RECORD_HEADER + captured)
        if captured <= MAX_RECORD and base + len(window) < end:
            window = _map(file, base, end)  # a record larger than the window
        file.seek(base + len(window))  # the file offset after what was read in, as a read leaves it: progress shows it
        at = yield from _walk(window, position - base, layout, base, path)
        if base + at == position:  # not one whole record in the window: the file ends inside it
            break
        position = base + at
    if position != size:
        raise SourceError(f"{path}: truncated file (last record incomplete)")


def read_pcap_stream(chunks: Iterable[Optional[bytes]], path: str, timestamps: bool) -> Iterator[FrameBatch]:
    """Walk a classic pcap stream as its chunks arrive (None: nothing arrived for a while, an empty batch)."""
    arrivals = Arrivals(chunks)
    while not arrivals.fill(PCAP_HEADER):
        if arrivals.ended:
            raise SourceError(f"{path}: truncated pcap header")
        yield FrameBatch.empty(NO_LINK_TYPE)
    layout = _layout(arrivals.buffer[:PCAP_HEADER], path, timestamps)
    arrivals.position = PCAP_HEADER
    wanted = RECORD_HEADER  # bytes from the walk's position needed before walking again
    while True:
        if not arrivals.fill(wanted):
            if arrivals.ended:
                break
            yield FrameBatch.empty(layout.link_type)
            continue
        buffer = arrivals.buffer
        at = arrivals.position = yield from _walk(buffer, arrivals.position, layout, arrivals.base, path)
        wanted = RECORD_HEADER if len(buffer) - at < RECORD_HEADER else RECORD_HEADER + layout.word(buffer, at + 8)[0]
    if arrivals.left:
        raise SourceError(f"{path}: truncated stream (it ended inside the record at byte "
                          f"{arrivals.base + arrivals.position})")


class Arrivals:
    """The bytes of an input read in chunks (a stream, or a file), the ones not walked yet in one buffer.

    Chunks are joined only once the record the walk waits for can be whole: a large record arriving
    in many small chunks is copied once, not once per chunk.
    """

    def __init__(self, chunks: Iterable[Optional[bytes]]):
        self._chunks = iter(chunks)
        self._parts: list[bytes] = []
        self._waiting = 0  # bytes in _parts
        self.buffer = b""
        self.position = 0  # where the walk is in buffer
        self.base = 0  # the input offset of buffer[0]
        self.ended = False

    @property
    def left(self) -> int:
        """Bytes that arrived and were not walked."""
        return len(self.buffer) - self.position + self._waiting

    def fill(self, wanted: int) -> bool:
        """Put ``wanted`` bytes or more from ``position`` in ``buffer`` (all that arrived): True when there.

        False when the input idles (a chunk of None) or ends (then ``ended`` is set); what arrived is kept.
        """
        while self.left < wanted:
            chunk = next(self._chunks, b"")
            if chunk is None:
                return False
            if not chunk:
                self.ended = True
                return False
            self._parts.append(chunk)
            self._waiting += len(chunk)
        if self._parts:
            self.buffer = b"".join([memoryview(self.buffer)[self.position:], *self._parts])
            self.base += self.position
            self.position, self._parts, self._waiting = 0, [], 0
        return True


def _layout(header: bytes, path: str, timestamps: bool) -> _Layout:
    if len(header) < PCAP_HEADER:
        raise SourceError(f"{path}: truncated pcap header")
    order, units = PCAP_MAGICS[header[:4]]
    link_type = struct.unpack(order + "I", header[20:24])[0] & 0x0FFFFFFF  # upper bits: FCS info
    check_link_type(link_type, path)
    return _Layout(link_type, order, units, np.dtype(order + "u4"), struct.Struct(order + "I").unpack_from, timestamps)


def _walk(buffer, at: int, layout: _Layout, base: int, path: str) -> Generator[FrameBatch, None, int]:
    """Batches of the whole records of ``buffer`` from ``at``, read in place; returns where the walk stopped.

    ``base`` is the input offset of ``buffer[0]``, for the error message of a corrupt record.
    """
    if len(buffer) - at < RECORD_HEADER:
        return at
    words = np.ndarray((len(buffer) - 3,), layout.fields, buffer, 0, (1,))
    while True:
        offsets, at, corrupt, stamps = pcap_records(buffer, at, layout.order, BATCH_FRAMES, MAX_RECORD,
                                                    layout.units if layout.timestamps else None)
        if len(offsets):
            starts = offsets + RECORD_HEADER
            captured, wire = words[offsets + 8].astype(np.int64), words[offsets + 12].astype(np.int64)
            yield FrameBatch(layout.link_type, buffer, starts, starts + captured, np.where(wire > 0, wire, captured),
                             stamps)
        if corrupt:
            raise SourceError(f"{path}: corrupt record at byte {base + at}")
        if len(offsets) < BATCH_FRAMES:
            return at


def _map(file, start: int, end: int) -> mmap.mmap:
    """Bytes ``start`` (a multiple of the allocation granularity) to ``end`` of a file, read in at once."""
    return mmap.mmap(file.fileno(), end - start, offset=start, flags=mmap.MAP_SHARED | MAP_POPULATE,
                     prot=mmap.PROT_READ)
