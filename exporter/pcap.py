"""Classic pcap files, walked through memory-mapped windows: where each frame lies, no copy."""
from __future__ import annotations

import mmap
import os
import struct
from typing import BinaryIO, Iterator

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


def read_pcap(file: BinaryIO, path: str, timestamps: bool) -> Iterator[FrameBatch]:
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
