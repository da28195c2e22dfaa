"""Replaying a capture file (pcap or pcapng): as fast as possible or at its recorded pace, once or in a loop."""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import BinaryIO, Iterator

from .frames import FrameBatch, SourceError
from .pcap import PCAP_MAGICS, read_pcap
from .pcapng import PCAPNG_MAGIC, read_pcapng

log = logging.getLogger(__name__)

# A loop over a file without a time span (one frame, or one timestamp) replays it once a second.
LOOP_PERIOD_WITHOUT_SPAN_SECONDS = 1.0


class PcapSource:
    """Replay a pcap or pcapng file, as fast as possible or at its recorded pace, once or in a loop.

    A file without frames ends the replay, loop or not, with a warning.
    """

    kind = "pcap"
    restartable = False  # read again, the file would be counted twice

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

def _read_frames(file: BinaryIO, path: str, timestamps: bool) -> Iterator[FrameBatch]:
    if file.read(4) == PCAPNG_MAGIC:
        file.seek(0)
        return read_pcapng(file, path, timestamps)
    file.seek(0)
    return read_pcap(file, path, timestamps)

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
