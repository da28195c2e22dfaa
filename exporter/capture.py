"""The capture thread: source -> decode -> classify -> tally, supervised and restarted with backoff."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping

from .classify import ServerSet, classify
from .decode import decode_key, sum_by_key
from .sources import FrameBatch, Source, SourceError
from .tally import Tally

log = logging.getLogger(__name__)

INITIAL_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
FLOW_MEMO_SIZE = 65536


class FrameCounter:
    """Decodes, classifies and sums batches of frames, remembering how recent flows classified."""

    def __init__(self, servers: ServerSet, port_labels: Mapping[tuple[int, int], str],
                 memo_size: int = FLOW_MEMO_SIZE):
        self.servers = servers
        self.port_labels = port_labels
        self.memo_size = memo_size
        self._memo: dict = {}  # frame key -> classify() result; cleared when full

    def count(self, batch: FrameBatch) -> tuple[dict, dict]:
        """Sum a batch: ((client, direction, protocol) -> [bytes, packets], ignore reason -> frames)."""
        # Sum per frame key first (equal for the frames of a flow), then decode and classify each
        # distinct key once: a batch holds far fewer flows than frames.
        flows = sum_by_key(batch.link_type, batch.buffer, batch.spans)
        memo = self._memo
        if len(memo) + len(flows) > self.memo_size:
            memo.clear()
        counts: dict = {}
        ignored: dict = {}
        for key, flow in flows.items():
            result = memo.get(key)
            if result is None:
                decoded = decode_key(key)
                result = memo[key] = decoded if decoded.__class__ is str else classify(
                    decoded, self.servers, self.port_labels)
            if result.__class__ is str:
                ignored[result] = ignored.get(result, 0) + flow[1]
                continue
            counter = counts.get(result)
            if counter is None:
                counts[result] = flow
            else:
                counter[0] += flow[0]
                counter[1] += flow[1]
        return counts, ignored


def count_frames(batch: FrameBatch, servers: ServerSet,
                 port_labels: Mapping[tuple[int, int], str]) -> tuple[dict, dict]:
    """Sum one batch (see ``FrameCounter.count``)."""
    return FrameCounter(servers, port_labels).count(batch)


class Capture:
    """Runs a source into the tally on a thread; on failure logs, reports and may restart with backoff.

    ``restart_on_error`` is for a source that can be opened again without counting anything twice
    (live capture). Without it the capture ends at its first failure of any kind: a replay opened
    again would count its file again.
    """

    def __init__(self, open_source: Callable[[], Source], tally: Tally, servers: ServerSet,
                 port_labels: Mapping[tuple[int, int], str], *, restart_on_error: bool = False):
        self.open_source = open_source
        self.tally = tally
        self.counter = FrameCounter(servers, port_labels)
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
                        counts, ignored = self.counter.count(batch)
                        self.tally.record(counts, ignored)
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
