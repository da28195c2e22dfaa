"""The capture thread: source -> counting engine -> tally, supervised, and the capture's health."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Optional

from .engine import FrameCounter
from .frames import Source, SourceError
from .tally import Tally

log = logging.getLogger(__name__)

INITIAL_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0


@dataclass(frozen=True)
class CaptureStatus:
    """Health of the capture, as shown by ``/`` and the ``traffic_exporter_capture_*`` metrics."""

    kind: str  # "live" or "pcap"
    name: str  # the interface, or the file
    filter: str = ""
    running: bool = False
    error: Optional[str] = None
    frames: int = 0  # every frame read, counted or ignored
    kernel_dropped: int = 0
    restarts: int = 0

    @property
    def description(self) -> str:
        return f"{self.kind}:{self.name}"


class Capture:
    """Runs a source into the tally on a thread, and owns the capture's health.

    On failure it logs and reports; a restartable source (live capture) is opened again with
    backoff, any other one (a replay, which would count its file twice) stays stopped.
    """

    def __init__(self, source: Source, tally: Tally, counter: FrameCounter, *, capture_filter: str = ""):
        self.source = source
        self.tally = tally
        self.counter = counter
        self._status = CaptureStatus(source.kind, source.name, capture_filter)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, name="capture", daemon=True)

    def status(self) -> CaptureStatus:
        """The capture's health now (an immutable copy, replaced as a whole by the capture thread)."""
        return self._status

    def _report(self, **changes: object) -> None:
        self._status = replace(self._status, **changes)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)

    def run(self) -> None:
        """Capture until stopped, until a replay ends, or until a source that cannot restart fails."""
        source, stop = self.source, self.stop_event
        backoff = INITIAL_BACKOFF_SECONDS
        while not stop.is_set():
            try:
                started = time.monotonic()
                self._report(running=True, error=None)
                for batch in source.batches(stop):
                    if batch:
                        self.tally.record(self.counter.count(batch))
                    else:
                        self.tally.expire()
                    self._report(frames=self._status.frames + len(batch), kernel_dropped=source.kernel_dropped())
                    if time.monotonic() - started > MAX_BACKOFF_SECONDS:
                        backoff = INITIAL_BACKOFF_SECONDS  # it ran healthy for a while: restart fast
                self._report(running=False)
                return  # stopped, or a replay ran to its end
            except SourceError as error:
                self._report(running=False, error=str(error))
                log.error("capture stopped: %s", error)
            except Exception as error:  # a bug: keep serving and say so
                self._report(running=False, error=f"{type(error).__name__}: {error}")
                log.exception("capture failed; %s", "restarting" if source.restartable else "not restarting")
            if not source.restartable or stop.wait(backoff):
                return
            self._report(restarts=self._status.restarts + 1)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
