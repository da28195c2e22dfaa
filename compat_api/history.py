"""History of the tally for the REST API: exact per-second totals, and per-client detail in bounded memory.

Every wall-clock second a ticker thread takes what the tally counted since the previous tick:
- its totals per (direction, protocol) go into a ring of ``seconds`` rows (one numpy array), exact
  and gap-free: a second without a tick reads as zero;
- its per-client bytes go into the detail: one entry per second for the newest ``FINE_SECONDS``
  seconds, then merged into spans of several seconds as they age, so that at most
  ``MAX_COARSE_SPANS`` spans cover the rest of the history. Each entry keeps its
  ``MAX_BUCKET_CLIENTS`` biggest clients; the others' bytes go to the client ``other``, so the
  per-client sums still add up to the totals. Detail memory is thus bounded whatever
  ``seconds`` and the number of clients (about 2 x 300 entries of 201 clients).
Readers copy what they need under a lock, so a view never mixes two seconds' states.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

from exporter.classify import DIRECTIONS
from exporter.tally import OTHER_CLIENT, Tally, count

log = logging.getLogger(__name__)

# Clients with their own detail in one entry; the rest fold into "other".
MAX_BUCKET_CLIENTS = 200
# Seconds that keep per-client detail of their own; older detail is merged into spans.
FINE_SECONDS = 300
MAX_COARSE_SPANS = 300
# Waking a little after the second boundary makes sure the tick lands in the next second.
TICK_DELAY_SECONDS = 0.005
# A restored second this far ahead of the clock means a corrupt file (or a clock set far back).
MAX_FUTURE_SECONDS = 60


class Detail(NamedTuple):
    """Bytes per client over ``seconds`` seconds from ``first`` (unix time); read-only once stored."""

    first: int
    seconds: int
    clients: tuple[str, ...]
    counts: np.ndarray  # (len(clients), direction, protocol) -> bytes
    health: Optional[np.ndarray] = None  # (len(clients), tally.window_health column); None: no TCP health


class SecondsView(NamedTuple):
    """Exact totals of consecutive seconds, oldest first."""

    stamps: np.ndarray  # unix time of the start of each second
    counts: np.ndarray  # (second, 0 bytes | 1 packets, direction, protocol)


class ClientsView(NamedTuple):
    """Bytes per client over the newest ``seconds`` seconds."""

    seconds: int
    clients: list[str]
    counts: np.ndarray  # (client, direction, protocol) -> bytes
    health: Optional[np.ndarray] = None  # (client, tally.window_health column); None: no TCP health kept


def fold_small_clients(clients: Sequence[str], counts: np.ndarray, keep: int = MAX_BUCKET_CLIENTS
                       ) -> tuple[tuple[str, ...], np.ndarray]:
    """Keep the ``keep`` biggest clients (ties by name) and add every other one into ``other``."""
    clients, counts, _ = _fold(clients, counts, None, keep)
    return clients, counts


def _fold(clients: Sequence[str], counts: np.ndarray, health: Optional[np.ndarray], keep: int = MAX_BUCKET_CLIENTS
          ) -> tuple[tuple[str, ...], np.ndarray, Optional[np.ndarray]]:
    """fold_small_clients, folding each client's TCP health (if any) alike."""
    clients = list(clients)
    named = [index for index, client in enumerate(clients) if client != OTHER_CLIENT]
    if len(named) <= keep:
        return tuple(clients), counts, health
    sizes = counts.reshape(len(clients), -1).sum(axis=1)
    named.sort(key=lambda index: (-int(sizes[index]), clients[index]))
    kept, folded = named[:keep], named[keep:]
    if OTHER_CLIENT in clients:
        folded.append(clients.index(OTHER_CLIENT))
    fold = lambda values: np.concatenate([values[kept], values[folded].sum(axis=0, keepdims=True)])  # noqa: E731
    return (*(clients[index] for index in kept), OTHER_CLIENT), fold(counts), None if health is None else fold(health)


def merge_details(first: int, seconds: int, details: Sequence[Detail]) -> Detail:
    """One entry holding the sum of ``details``, folded to the biggest clients."""
    index: dict[str, int] = {}
    for detail in details:
        for client in detail.clients:
            index.setdefault(client, len(index))
    counts = np.zeros((len(index), *details[0].counts.shape[1:]), np.int64)
    health = _sum_health(index, details)
    for detail in details:
        counts[[index[client] for client in detail.clients]] += detail.counts
    return Detail(first, seconds, *_fold(list(index), counts, health))


def _sum_health(index: dict[str, int], details: Sequence[Detail]) -> Optional[np.ndarray]:
    """The TCP health of ``details`` per client of ``index``; None when none of them has any."""
    widths = {detail.health.shape[1] for detail in details if detail.health is not None}
    if not widths:
        return None
    health = np.zeros((len(index), widths.pop()), np.int64)
    for detail in details:
        if detail.health is not None:
            health[[index[client] for client in detail.clients]] += detail.health
    return health


class History:
    """The last ``seconds`` seconds of ``tally``'s traffic, per protocol label of the tally."""

    def __init__(self, tally: Tally, seconds: int):
        self.tally = tally
        self.seconds = seconds
        self.labels = tally.labels
        self._totals = np.zeros((seconds, 2, len(DIRECTIONS), len(self.labels)), np.int64)
        self._newest: Optional[int] = None  # the newest second stored
        self._oldest: Optional[int] = None  # the oldest second stored (for the window lengths)
        self._fine: deque[Detail] = deque()
        self._coarse: deque[Detail] = deque()
        self._open_span: list[Detail] = []  # aged seconds not yet merged into a span
        self._span_seconds = max(1, math.ceil(max(0, seconds - FINE_SECONDS) / MAX_COARSE_SPANS))
        self._lock = threading.Lock()  # guards everything above for readers
        self._tick_lock = threading.Lock()  # keeps take_bucket and append in the same order
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the daemon ticker thread that calls ``tick()`` just after every wall-clock second."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="history", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the ticker thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(math.floor(time.time()) + 1 + TICK_DELAY_SECONDS - time.time()):
            try:
                self.tick()
            except Exception:  # a bug must not end the history; the next tick tries again
                log.exception("history tick failed")

    def tick(self, now: Optional[float] = None) -> None:
        """Close the second that ended at ``floor(now)`` and store it, zero-filling missed seconds.

        ``now`` (unix seconds, default: the wall clock) is the moment just after the second being
        closed, so the second is stamped ``floor(now) - 1``. Several ticks within one second, or a
        clock stepped back, add into the newest second instead of breaking the order.
        """
        now = time.time() if now is None else now
        with self._tick_lock:
            bucket = self.tally.take_bucket()
            with self._lock:
                self._append(math.floor(now) - 1, bucket.totals, bucket.clients, bucket.counts, bucket.health)

    def _append(self, stamp: int, totals: np.ndarray, clients: Sequence[str], counts: np.ndarray,
                health: Optional[np.ndarray] = None) -> None:
        ring = self._totals
        if self._newest is not None and stamp <= self._newest:
            stamp = self._newest  # the clock did not advance: add into the newest second
        elif self._newest is None:
            self._oldest = stamp
            ring[:] = 0
        else:
            missed = range(self._newest + 1, min(stamp, self._newest + 1 + self.seconds))
            ring[[second % self.seconds for second in missed]] = 0
            ring[stamp % self.seconds] = 0
        ring[stamp % self.seconds] += totals
        self._newest = stamp
        self._oldest = max(self._oldest, stamp - self.seconds + 1)
        if not clients:
            self._age_detail()
            return
        detail = Detail(stamp, 1, *_fold(clients, counts, health))
        if self._fine and self._fine[-1].first == stamp:
            newest = self._fine.pop()
            self._fine.append(merge_details(stamp, 1, [newest, detail]))
        else:
            self._fine.append(detail)
        self._age_detail()

    def _age_detail(self) -> None:
        """Move seconds older than ``FINE_SECONDS`` into spans; drop what left the history."""
        fine_start = self._newest - min(self.seconds, FINE_SECONDS) + 1
        while self._fine and self._fine[0].first < fine_start:
            aged = self._fine.popleft()
            if self._open_span and aged.first >= self._open_span[0].first + self._span_seconds:
                self._close_span()
            self._open_span.append(aged)
        if self._open_span and fine_start >= self._open_span[0].first + self._span_seconds:
            self._close_span()
        while self._coarse and self._coarse[0].first + self._coarse[0].seconds <= self._oldest:
            self._coarse.popleft()
        if self._open_span and self._open_span[0].first < self._oldest:
            self._open_span = [detail for detail in self._open_span if detail.first >= self._oldest]

    def _close_span(self) -> None:
        first = self._open_span[0].first
        self._coarse.append(merge_details(first, self._span_seconds, self._open_span))
        self._open_span = []

    def seconds_window(self, seconds: int) -> SecondsView:
        """Totals of the newest ``seconds`` seconds (fewer right after start), oldest first."""
        with self._lock:
            if self._newest is None:
                return SecondsView(np.zeros(0, np.int64), self._totals[:0].copy())
            stored = self._newest - self._oldest + 1
            stamps = np.arange(self._newest - min(seconds, stored) + 1, self._newest + 1, dtype=np.int64)
            return SecondsView(stamps, self._totals[stamps % self.seconds])

    def clients_window(self, seconds: int) -> ClientsView:
        """Bytes per client over the newest ``seconds`` seconds, as kept by the detail.

        A span reaching back past the window is left out, so beyond ``FINE_SECONDS`` the view may
        cover a little less than asked; its ``seconds`` says how much it covers.
        """
        with self._lock:
            if self._newest is None:
                return ClientsView(0, [], np.zeros((0, len(DIRECTIONS), len(self.labels)), np.int64))
            start = self._newest - min(seconds, self._newest - self._oldest + 1) + 1
            covered_start = start
            chosen = []
            for detail in (*self._coarse, *self._open_span, *self._fine):
                if detail.first >= start:
                    chosen.append(detail)
                elif detail.first + detail.seconds > start:  # straddles the window's start
                    covered_start = detail.first + detail.seconds
            newest = self._newest
        index: dict[str, int] = {}
        for detail in chosen:
            for client in detail.clients:
                index.setdefault(client, len(index))
        counts = np.zeros((len(index), len(DIRECTIONS), len(self.labels)), np.int64)
        for detail in chosen:
            counts[[index[client] for client in detail.clients]] += detail.counts
        return ClientsView(newest - covered_start + 1, list(index), counts, _sum_health(index, chosen))

    def export_state(self) -> dict:
        """The history as JSON-ready data, for ``--state-file``: seconds with traffic, and the detail."""
        with self._lock:
            if self._newest is None:
                return {"labels": list(self.labels), "stored": None, "seconds": [], "details": []}
            stamps = np.arange(self._oldest, self._newest + 1, dtype=np.int64)
            totals = self._totals[stamps % self.seconds]
            return {
                "labels": list(self.labels),
                "stored": [self._oldest, self._newest],
                "seconds": [[int(stamp), counts.reshape(-1).tolist()]
                            for stamp, counts in zip(stamps, totals) if counts.any()],
                "details": [[detail.first, detail.seconds, list(detail.clients), detail.counts.reshape(-1).tolist()]
                            for detail in (*self._coarse, *self._open_span, *self._fine)],
            }

    def prepare_restore(self, state: object, now: Optional[float] = None) -> Callable[[], None]:
        """Check a history saved by ``export_state``; return what puts it back (before the first tick).

        Raises ValueError (or KeyError/TypeError) on data of the wrong shape or range, or seconds
        in the future, changing nothing. What is older than this history's length is left out.
        """
        now = time.time() if now is None else now
        if isinstance(state, list):
            state = self._from_version_1(state)
        labels = state["labels"]
        if not isinstance(labels, list) or sorted(labels) != sorted(self.labels):
            raise ValueError(f"saved protocol labels {labels!r} differ from {list(self.labels)!r}")
        order = [labels.index(label) for label in self.labels]
        shape = (2, len(DIRECTIONS), len(labels))
        stored = state["stored"]
        if stored is None:
            return lambda: None
        oldest, newest = stored
        self._check_stamp(oldest, None, now)
        self._check_stamp(newest, oldest - 1, now)
        seconds, last = [], oldest - 1
        for stamp, counts in state["seconds"]:
            self._check_stamp(stamp, last, now)
            seconds.append((stamp, self._counts(counts, shape)[..., order]))
            last = stamp
        details, last = [], oldest - 1
        for first, span, clients, counts in state["details"]:
            self._check_stamp(first, last, now)
            if type(span) is not int or not 1 <= span or first + span - 1 > newest or not isinstance(clients, list) \
                    or not all(isinstance(client, str) for client in clients) or len(set(clients)) != len(clients):
                raise ValueError(f"bad detail entry at {first}")
            details.append(Detail(first, span, tuple(clients),
                                  self._counts(counts, (len(clients), *shape[1:]))[..., order]))
            last = first
        if last > newest or (seconds and seconds[-1][0] > newest):
            raise ValueError("history seconds beyond the newest stored one")

        def apply() -> None:
            with self._lock:
                if self._newest is not None:
                    raise RuntimeError("a history is restored before its first tick")
                self._newest, self._oldest = newest, max(oldest, newest - self.seconds + 1)
                for stamp, counts in seconds:
                    if stamp >= self._oldest:
                        self._totals[stamp % self.seconds] = counts
                for detail in details:
                    (self._fine if detail.seconds == 1 else self._coarse).append(detail)
                self._age_detail()

        return apply

    def _from_version_1(self, rows: list) -> dict:
        """A version 1 history (one row per second: stamp, totals rows, client rows) in today's form."""
        seconds, details = [], []
        for stamp, totals, clients in rows:
            counts = np.zeros((2, len(DIRECTIONS), len(self.labels)), np.int64)
            for direction, protocol, nbytes, packets in totals:
                cell = (DIRECTIONS.index(direction), self.labels.index(protocol))
                counts[(0, *cell)], counts[(1, *cell)] = count(nbytes), count(packets)
            seconds.append([stamp, counts.reshape(-1).tolist()])
            detail = np.zeros((len(clients), len(DIRECTIONS), len(self.labels)), np.int64)
            for row, client_rows in enumerate(clients.values()):
                for direction, protocol, nbytes in client_rows:
                    detail[row, DIRECTIONS.index(direction), self.labels.index(protocol)] = count(nbytes)
            if clients:
                details.append([stamp, 1, list(clients), detail.reshape(-1).tolist()])
        stored = [seconds[0][0], seconds[-1][0]] if seconds else None
        return {"labels": list(self.labels), "stored": stored, "seconds": seconds, "details": details}

    @staticmethod
    def _check_stamp(stamp: object, last: Optional[int], now: float) -> None:
        if type(stamp) is not int or stamp > now + MAX_FUTURE_SECONDS:
            raise ValueError(f"bad or future second {stamp!r}")
        if last is not None and stamp <= last:
            raise ValueError("history seconds out of order")

    @staticmethod
    def _counts(values: object, shape: tuple[int, ...]) -> np.ndarray:
        if not isinstance(values, list) or len(values) != math.prod(shape):
            raise ValueError(f"expected {math.prod(shape)} counters")
        return np.array([count(value) for value in values], np.int64).reshape(shape)
