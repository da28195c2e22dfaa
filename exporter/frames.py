"""Frames as sources hand them over: batches located in one shared buffer, and what a source is.

A source yields ``FrameBatch``es; an empty batch means "nothing arrived for a while", so the
consumer can do housekeeping.
"""
from __future__ import annotations

import threading
from typing import Iterator, Optional, Protocol, Sequence

import numpy as np

from .decode import supported_link_types

# Frames per batch: large batches amortize the per-flow work; the cap bounds the memory a batch of
# distinct flows (an address flood) takes.
BATCH_FRAMES = 32768

MAX_RECORD = 1 << 28  # no sane capture record or block is larger; beyond it the file is corrupt


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
    """Where frames come from: a live interface or a capture file."""

    kind: str  # "live" or "pcap"
    name: str  # the interface, or the file
    restartable: bool  # whether it may be read again after an error without counting anything twice

    def batches(self, stop: threading.Event) -> Iterator[FrameBatch]:
        """Batches of frames until ``stop`` is set, the source ends, or an error (SourceError)."""

    def kernel_dropped(self) -> int:
        """Frames dropped before the exporter could read them."""


def check_link_type(link_type: int, where: str) -> None:
    """Refuse a capture whose link type the decoder does not understand."""
    if link_type not in supported_link_types():
        supported = ", ".join(str(t) for t in sorted(supported_link_types()))
        raise SourceError(f"{where}: unsupported link type {link_type} (supported: {supported})")
