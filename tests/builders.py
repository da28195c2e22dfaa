"""Small builders shared by the unit tests."""
from __future__ import annotations

import ipaddress
from typing import Mapping, Optional

from exporter.classify import DEFAULT_PORT_LABELS, protocol_labels
from exporter.engine import BatchCounts, ClientGrouping, counts_from_mapping

LABELS = protocol_labels(DEFAULT_PORT_LABELS)


def batch_counts(entries: Mapping[tuple, tuple[int, int]], ignored: Optional[dict] = None,
                 grouping: Optional[ClientGrouping] = None) -> BatchCounts:
    """The engine's sums of a batch from ``{(address, direction, label): (bytes, packets)}``.

    Addresses may be text or packed bytes.
    """
    packed = {}
    for (address, direction, label), (nbytes, packets) in entries.items():
        if isinstance(address, str):
            address = ipaddress.ip_address(address).packed
        total = packed.setdefault((address, direction, label), [0, 0])
        total[0] += nbytes
        total[1] += packets
    return counts_from_mapping(packed, LABELS, grouping)._replace(ignored=dict(ignored or {}))


def frames_of(batch) -> list:
    """The frames of a batch, copied out of its buffer."""
    from exporter.sources import Frame
    return [Frame(wire, bytes(batch.buffer[start:end]))
            for start, end, wire in zip(batch.starts.tolist(), batch.ends.tolist(), batch.wire_lengths.tolist())]


def spans_of(batch) -> list[tuple[int, int, int]]:
    """(start, end, wire_length) of each frame of a batch."""
    return list(zip(batch.starts.tolist(), batch.ends.tolist(), batch.wire_lengths.tolist()))


def count_frames(frames, servers, link_type: int = 1, grouping: Optional[ClientGrouping] = None) -> BatchCounts:
    """What the counting engine sums of ``frames`` (``Frame``s of ``link_type``) for ``servers``."""
    from exporter.classify import DEFAULT_PORT_LABELS
    from exporter.engine import FrameCounter
    from exporter.sources import FrameBatch
    counter = FrameCounter(servers, DEFAULT_PORT_LABELS, LABELS, grouping)
    return counter.count(FrameBatch.of(link_type, frames))


def sums_of(counts: BatchCounts, grouping: Optional[ClientGrouping] = None) -> dict:
    """``{(client label, direction, protocol): [bytes, packets]}`` of the engine's sums (rows added up)."""
    from exporter.engine import DIRECTIONS
    grouping = grouping or ClientGrouping()
    sums: dict = {}
    for key, cells in zip(zip(counts.family.tolist(), counts.hi.tolist(), counts.lo.tolist()), counts.counts):
        for direction, label in zip(*cells[1].nonzero()):
            total = sums.setdefault((grouping.name(key), DIRECTIONS[direction], LABELS[label]), [0, 0])
            total[0] += int(cells[0, direction, label])
            total[1] += int(cells[1, direction, label])
    return sums


def timestamps_of(batch) -> list:
    """The batch's timestamps, None where a frame was recorded without one."""
    return [None if stamp != stamp else stamp for stamp in batch.timestamps.tolist()]  # NaN != NaN
