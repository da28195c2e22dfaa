"""One-second history of the tally for the REST API: a ring of compressed, immutable buckets.

Every wall-clock second a ticker thread takes what the tally counted since the previous tick and
appends it, compressed, to a ``deque(maxlen=seconds)``. Readers copy the ring under a lock, so a
view never mixes two seconds' states, and the tally's own lock is held only by ``take_bucket``.
"""
from __future__ import annotations

import collections
import itertools
import logging
import math
import threading
import time
from typing import Callable, Mapping, NamedTuple, Optional

from exporter.tally import OTHER_CLIENT, Tally

log = logging.getLogger(__name__)

# Clients with their own detail in one bucket; the rest fold into "other", so totals stay exact and
# a bucket's size is bounded whatever the number of clients.
MAX_BUCKET_CLIENTS = 200
# Waking a little after the second boundary makes sure the tick lands in the next second.
TICK_DELAY_SECONDS = 0.005

SeriesKey = tuple[str, str]  # (direction, protocol)


class Bucket(NamedTuple):
    """What was counted during one second; read-only once appended."""

    timestamp: int  # unix time of the start of the second
    totals: Mapping[SeriesKey, tuple[int, int]]  # (direction, protocol) -> (bytes, packets), exact
    clients: Mapping[str, Mapping[SeriesKey, int]]  # client -> (direction, protocol) -> bytes


def compress(raw: Mapping[tuple, list], max_clients: int = MAX_BUCKET_CLIENTS
             ) -> tuple[dict[SeriesKey, tuple[int, int]], dict[str, dict[SeriesKey, int]]]:
    """Turn a tally bucket into exact totals plus per-client bytes for the biggest ``max_clients``."""
    totals: dict[SeriesKey, tuple[int, int]] = {}
    clients: dict[str, dict[SeriesKey, int]] = {}
    for (client, direction, protocol), (nbytes, packets) in raw.items():
        key = (direction, protocol)
        old_bytes, old_packets = totals.get(key, (0, 0))
        totals[key] = (old_bytes + nbytes, old_packets + packets)
        detail = clients.setdefault(client, {})
        detail[key] = detail.get(key, 0) + nbytes
    return totals, _fold_small_clients(clients, max_clients)


def _fold_small_clients(clients: dict[str, dict[SeriesKey, int]], max_clients: int
                        ) -> dict[str, dict[SeriesKey, int]]:
    named = [client for client in clients if client != OTHER_CLIENT]
    if len(named) <= max_clients:
        return clients
    named.sort(key=lambda client: (-sum(clients[client].values()), client))
    kept = {client: clients[client] for client in named[:max_clients]}
    other = dict(clients.get(OTHER_CLIENT, {}))
    for client in named[max_clients:]:
        for key, nbytes in clients[client].items():
            other[key] = other.get(key, 0) + nbytes
    kept[OTHER_CLIENT] = other
    return kept


def _merge(older: Bucket, newer: Bucket) -> Bucket:
    """Add ``newer`` into ``older`` (same second): used when the wall clock does not advance."""
    totals = dict(older.totals)
    for key, (nbytes, packets) in newer.totals.items():
        old_bytes, old_packets = totals.get(key, (0, 0))
        totals[key] = (old_bytes + nbytes, old_packets + packets)
    clients = {client: dict(detail) for client, detail in older.clients.items()}
    for client, detail in newer.clients.items():
        merged = clients.setdefault(client, {})
        for key, nbytes in detail.items():
            merged[key] = merged.get(key, 0) + nbytes
    return Bucket(older.timestamp, totals, _fold_small_clients(clients, MAX_BUCKET_CLIENTS))


class History:
    """The last ``seconds`` one-second buckets of ``tally``, oldest first, without gaps."""

    def __init__(self, tally: Tally, seconds: int):
        self.tally = tally
        self.seconds = seconds
        self._buckets: collections.deque[Bucket] = collections.deque(maxlen=seconds)
        self._lock = threading.Lock()  # guards _buckets for readers
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
        """Close the second that ended at ``floor(now)`` and append it, zero-filling missed seconds.

        ``now`` (unix seconds, default: the wall clock) is the moment just after the second being
        closed, so the bucket is stamped ``floor(now) - 1``. Several ticks within one second, or a
        clock stepped back, add into the newest bucket instead of breaking the order.
        """
        now = time.time() if now is None else now
        with self._tick_lock:
            totals, clients = compress(self.tally.take_bucket())
            bucket = Bucket(math.floor(now) - 1, totals, clients)
            with self._lock:
                self._append(bucket)

    def _append(self, bucket: Bucket) -> None:
        buckets = self._buckets
        if buckets and bucket.timestamp <= buckets[-1].timestamp:
            buckets[-1] = _merge(buckets[-1], bucket)
            return
        if buckets:
            missed = bucket.timestamp - buckets[-1].timestamp - 1
            first_missed = bucket.timestamp - min(missed, self.seconds)
            buckets.extend(Bucket(stamp, {}, {}) for stamp in range(first_missed, bucket.timestamp))
        buckets.append(bucket)

    def window(self, seconds: int) -> list[Bucket]:
        """The newest ``seconds`` buckets (fewer right after start), oldest first, as one consistent copy."""
        with self._lock:
            start = max(0, len(self._buckets) - seconds)
            return list(itertools.islice(self._buckets, start, None))

    def export_state(self) -> list:
        """The buckets as JSON-ready rows, oldest first, for ``--state-file``."""
        with self._lock:
            return [[bucket.timestamp,
                     [[direction, protocol, nbytes, packets]
                      for (direction, protocol), (nbytes, packets) in bucket.totals.items()],
                     {client: [[direction, protocol, nbytes] for (direction, protocol), nbytes in detail.items()]
                      for client, detail in bucket.clients.items()}]
                    for bucket in self._buckets]

    def prepare_restore(self, rows: list) -> Callable[[], None]:
        """Check buckets saved by ``export_state``; return what puts them back (before any new bucket).

        Raises ValueError (or KeyError/TypeError) on data of the wrong shape, changing nothing.
        """
        buckets = []
        for timestamp, totals, clients in rows:
            bucket = Bucket(int(timestamp),
                            {(str(d), str(p)): (int(b), int(n)) for d, p, b, n in totals},
                            {str(client): {(str(d), str(p)): int(b) for d, p, b in detail}
                             for client, detail in clients.items()})
            if buckets and bucket.timestamp <= buckets[-1].timestamp:
                raise ValueError("history buckets out of order")
            buckets.append(bucket)

        def apply() -> None:
            with self._lock:
                newer = list(self._buckets)
                self._buckets.clear()
                for bucket in buckets + newer:
                    self._append(bucket)

        return apply

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)
