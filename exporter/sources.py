"""Frame sources: pcap/pcapng replay (live capture joins the same interface).

A source yields batches of frames ``(timestamp, wire_length, link_type, data)``; an empty batch
means "nothing arrived for a while" so the consumer can do housekeeping.
"""
from __future__ import annotations

import os
import struct
import threading
import time
from typing import Iterator, NamedTuple, Protocol

from .decode import supported_link_types

BATCH_FRAMES = 4096
READ_CHUNK = 1 << 22
MAX_RECORD = 1 << 28  # no sane capture record is larger; beyond it the file is corrupt
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
# magic -> (byte order, timestamp fraction units per second)
PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e6), b"\xa1\xb2\xc3\xd4": (">", 1e6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e9), b"\xa1\xb2\x3c\x4d": (">", 1e9),
}


class Frame(NamedTuple):
    """One captured frame. Readers on the hot path build plain tuples in this order: cheaper."""

    timestamp: float
    wire_length: int
    link_type: int
    data: bytes


class SourceError(Exception):
    """A source cannot be read; the message is meant for the operator."""


class Source(Protocol):
    kind: str  # "live" or "pcap"
    name: str  # interface name or file path

    def batches(self, stop: threading.Event) -> Iterator[list[Frame]]: ...

    def kernel_dropped(self) -> int: ...


def check_link_type(link_type: int, where: str) -> None:
    """Refuse a capture whose link type the decoder does not understand."""
    if link_type not in supported_link_types():
        supported = ", ".join(str(t) for t in sorted(supported_link_types()))
        raise SourceError(f"{where}: unsupported link type {link_type} (supported: {supported})")


class PcapSource:
    """Replay a pcap or pcapng file, as fast as possible or at its recorded pace, once or in a loop."""

    kind = "pcap"

    def __init__(self, path: str, *, realtime: bool = False, loop: bool = False,
                 batch_frames: int = BATCH_FRAMES):
        self.name = path
        self.realtime = realtime
        self.loop = loop
        self.batch_frames = batch_frames
        self._open().close()  # fail at start-up, not in the capture thread, on a missing or foreign file

    def kernel_dropped(self) -> int:
        return 0

    def batches(self, stop: threading.Event) -> Iterator[list[Frame]]:
        while True:
            with self._open() as file:
                frames = _read_frames(file, self.name, self.batch_frames)
                if self.realtime:
                    frames = _paced(frames, stop)
                for batch in frames:
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


def _read_frames(file, path: str, batch_frames: int) -> Iterator[list[Frame]]:
    if file.read(4) == PCAPNG_MAGIC:
        file.seek(0)
        return _read_pcapng(file, path, batch_frames)
    file.seek(0)
    return _read_pcap(file, path, batch_frames)


def _read_pcap(file, path: str, batch_frames: int) -> Iterator[list[Frame]]:
    """Walk a classic pcap file in large chunks: far cheaper per frame than a record-at-a-time reader."""
    header = file.read(24)
    if len(header) < 24:
        raise SourceError(f"{path}: truncated pcap header")
    order, units = PCAP_MAGICS[header[:4]]
    link_type = struct.unpack(order + "I", header[20:24])[0] & 0x0FFFFFFF  # upper bits: FCS info
    check_link_type(link_type, path)
    record = struct.Struct(order + "IIII")
    unpack_from = record.unpack_from
    buffer = b""
    position = 0
    while True:
        chunk = file.read(READ_CHUNK)
        if not chunk:
            break
        buffer = buffer[position:] + chunk
        position = 0
        end = len(buffer)
        batch: list[Frame] = []
        append = batch.append
        while position + 16 <= end:
            seconds, fraction, captured, wire_length = unpack_from(buffer, position)
            if captured > MAX_RECORD:
                raise SourceError(f"{path}: corrupt record at byte {file.tell() - end + position}")
            stop = position + 16 + captured
            if stop > end:
                break
            append((seconds + fraction / units, wire_length or captured, link_type, buffer[position + 16:stop]))
            position = stop
            if len(batch) == batch_frames:
                yield batch
                batch = []
                append = batch.append
        if batch:
            yield batch
    if position != len(buffer):
        raise SourceError(f"{path}: truncated file (last record incomplete)")


def _read_pcapng(file, path: str, batch_frames: int) -> Iterator[list[Frame]]:
    from scapy.error import Scapy_Exception
    from scapy.utils import RawPcapNgReader

    try:
        reader = RawPcapNgReader(file)
    except (Scapy_Exception, EOFError, struct.error, ValueError) as error:
        raise SourceError(f"{path}: corrupt pcapng file ({error})") from None
    checked: set[int] = set()
    batch: list[Frame] = []
    packets = iter(reader)  # Scapy reads at most 64 KiB of a record: plenty for headers
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
        timestamp = ((meta.tshigh << 32) + meta.tslow) / meta.tsresol if meta.tsresol else 0.0
        batch.append((timestamp, meta.wirelen or len(data), meta.linktype, data))
        if len(batch) == batch_frames:
            yield batch
            batch = []
    if file.tell() != os.fstat(file.fileno()).st_size:
        raise SourceError(f"{path}: truncated or corrupt pcapng block at byte {file.tell()}")
    if batch:
        yield batch


def _paced(batches: Iterator[list[Frame]], stop: threading.Event) -> Iterator[list[Frame]]:
    """Release frames at the pace their timestamps were recorded."""
    started = time.monotonic()
    first = None
    for batch in batches:
        pending: list[Frame] = []
        for frame in batch:
            if first is None:
                first = frame[0]
            delay = (frame[0] - first) - (time.monotonic() - started)
            if delay > 0:
                if pending:
                    yield pending
                    pending = []
                if stop.wait(delay):
                    return
            pending.append(frame)
        if pending:
            yield pending


