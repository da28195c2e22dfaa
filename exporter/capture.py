"""The capture thread: source -> counting engine -> tally, supervised and restarted with backoff."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .engine import FrameCounter
from .sources import Source, SourceError
from .tally import Tally

log = logging.getLogger(__name__)

INITIAL_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0


class Capture:
    """Runs a source into the tally on a thread; on failure logs, reports and may restart with backoff.

    ``restart_on_error`` is for a source that can be opened again without counting anything twice
    (live capture). Without it the capture ends at its first failure of any kind: a replay opened
    again would count its file again.
    """

    def __init__(self, open_source: Callable[[], Source], tally: Tally, counter: FrameCounter, *,
                 restart_on_error: bool = False):
        self.open_source = open_source
        self.tally = tally
        self.counter = counter
        self.restart_on_error = restart_on_error
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, name="capture", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)

    def run(self) -> None:
        """Capture until stopped or until a non-looping replay ends."""
        status = self.tally.status
        stop = self.stop_event
        backoff = INITIAL_BACKOFF_SECONDS
        while not stop.is_set():
            try:
                source = self.open_source()
                status.running, status.error = True, None
                opened = time.monotonic()
                for batch in source.batches(stop):
                    if batch:
                        self.tally.record(self.counter.count(batch))
                    else:
                        self.tally.expire()
                    status.kernel_dropped = source.kernel_dropped()
                    if time.monotonic() - opened > MAX_BACKOFF_SECONDS:
                        backoff = INITIAL_BACKOFF_SECONDS  # it ran healthy for a while: restart fast
                status.running = False
                if source.kind == "pcap":
                    return  # a replay that ran to its end is finished, not failed
            except SourceError as error:
                status.running, status.error = False, str(error)
                log.error("capture stopped: %s", error)
                if not self.restart_on_error:
                    return
            except Exception as error:  # a bug: keep serving and say so
                status.running, status.error = False, f"{type(error).__name__}: {error}"
                if not self.restart_on_error:
                    log.exception("capture failed; not restarting")
                    return
                log.exception("capture failed; restarting in %.0f s", backoff)
            if stop.wait(backoff):
                return
            status.restarts += 1
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
