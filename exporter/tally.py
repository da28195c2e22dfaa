"""The exporter's state: cumulative counters per client, the current one-second bucket, capture health.

The capture thread is the only writer and records whole batches under one short lock; readers
(the Prometheus collector, the REST history) take copies under the same lock.
"""
from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional

OTHER_CLIENT = "other"
RESULTS = ("counted", "not_ip", "not_server", "internal", "malformed")
# Packed address -> label text. Cleared when full: a flood of addresses costs CPU, never memory.
NAME_CACHE_SIZE = 65536

SeriesKey = tuple  # (client, direction, protocol)
BatchCounts = Mapping[tuple, list]  # (packed client, direction, protocol) -> [bytes, packets]


@dataclass
class CaptureStatus:
    """Health of the capture, as shown in ``/`` and the ``traffic_exporter_capture_*`` metrics."""

    source: str = ""  # "live" or "pcap"
    interface: str = ""  # interface name, or the pcap file
    filter: str = ""
    running: bool = False
    error: Optional[str] = None
    kernel_dropped: int = 0
    restarts: int = 0

    @property
    def description(self) -> str:
        return f"{self.source}:{self.interface}" if self.source else ""


class ClientTally:
    """Counters of one client label: (direction, protocol) -> [bytes, packets]."""

    __slots__ = ("last_seen", "counters")

    def __init__(self, last_seen: float):
        self.last_seen = last_seen
        self.counters: dict[tuple[str, str], list[int]] = {}

    def add(self, direction: str, protocol: str, nbytes: int, packets: int) -> None:
        counter = self.counters.get((direction, protocol))
        if counter is None:
            self.counters[(direction, protocol)] = [nbytes, packets]
        else:
            counter[0] += nbytes
            counter[1] += packets


@dataclass(frozen=True)
class TallySnapshot:
    """A consistent copy of the counters, taken at one instant."""

    series: dict  # (client, direction, protocol) -> (bytes, packets)
    results: dict  # result -> frames
    tracked_clients: int
    max_clients: int
    evictions: int
    status: CaptureStatus = field(default_factory=CaptureStatus)

    @property
    def frames(self) -> int:
        return sum(self.results.values())


class Tally:
    """Cumulative per-client counters with a bounded client table, plus the current second's bucket."""

    def __init__(self, *, max_clients: int = 500, client_idle_seconds: float = 900,
                 client_prefix_v4: int = 32, client_prefix_v6: int = 128,
                 clock: Callable[[], float] = time.monotonic):
        self.max_clients = max_clients
        self.client_idle_seconds = client_idle_seconds
        self.client_prefix = {4: client_prefix_v4, 16: client_prefix_v6}
        self.clock = clock
        self.status = CaptureStatus()
        self._lock = threading.Lock()
        self._clients: dict[str, ClientTally] = {}
        self._other = ClientTally(0.0)
        self._names: dict[bytes, str] = {}
        self._results = dict.fromkeys(RESULTS, 0)
        self._evictions = 0
        self._bucket: dict[SeriesKey, list[int]] = {}
        self._last_expiry = clock()

    def record(self, counts: BatchCounts, ignored: Mapping[str, int]) -> None:
        """Add one batch: per-(client, direction, protocol) sums and ignored frames by reason."""
        now = self.clock()
        with self._lock:
            results = self._results
            for reason, frames in ignored.items():
                results[reason] += frames
            clients, bucket, names = self._clients, self._bucket, self._names
            counted = 0
            for (packed, direction, protocol), (nbytes, packets) in counts.items():
                client = names.get(packed) or self._name(packed)
                entry = clients.get(client)
                if entry is None:
                    if len(clients) < self.max_clients:
                        entry = clients[client] = ClientTally(now)
                    else:
                        client, entry = OTHER_CLIENT, self._other
                entry.last_seen = now
                counted += packets
                # ClientTally.add and the bucket update, inlined: this loop runs per key per batch.
                counter = entry.counters.get((direction, protocol))
                if counter is None:
                    entry.counters[(direction, protocol)] = [nbytes, packets]
                else:
                    counter[0] += nbytes
                    counter[1] += packets
                key = (client, direction, protocol)
                counter = bucket.get(key)
                if counter is None:
                    bucket[key] = [nbytes, packets]
                else:
                    counter[0] += nbytes
                    counter[1] += packets
            results["counted"] += counted
            if now - self._last_expiry >= 1.0:
                self._expire(now)

    def expire(self) -> None:
        """Evict idle clients; called by the capture loop when no traffic arrives."""
        with self._lock:
            self._expire(self.clock())

    def _expire(self, now: float) -> None:
        # Evicted clients' counters move to ``other``: their series vanish, yet every remaining
        # series stays monotonic and the sum over all series stays the exact total.
        self._last_expiry = now
        deadline = now - self.client_idle_seconds
        idle = [client for client, entry in self._clients.items() if entry.last_seen < deadline]
        for client in idle:
            for (direction, protocol), (nbytes, packets) in self._clients.pop(client).counters.items():
                self._other.add(direction, protocol, nbytes, packets)
        self._evictions += len(idle)

    def _name(self, packed: bytes) -> str:
        prefix = self.client_prefix[len(packed)]
        if prefix == len(packed) * 8:
            name = str(ipaddress.ip_address(packed))
        else:
            name = str(ipaddress.ip_network((packed, prefix), strict=False))
        if len(self._names) >= NAME_CACHE_SIZE:
            self._names.clear()
        self._names[packed] = name
        return name

    def take_bucket(self) -> dict[SeriesKey, list[int]]:
        """Return what was counted since the previous call: (client, direction, protocol) -> [bytes, packets]."""
        with self._lock:
            bucket, self._bucket = self._bucket, {}
        return bucket

    def snapshot(self) -> TallySnapshot:
        """Copy the cumulative counters and capture status consistently."""
        with self._lock:
            series = {}
            for client, entry in self._clients.items():
                for (direction, protocol), (nbytes, packets) in entry.counters.items():
                    series[(client, direction, protocol)] = (nbytes, packets)
            for (direction, protocol), (nbytes, packets) in self._other.counters.items():
                series[(OTHER_CLIENT, direction, protocol)] = (nbytes, packets)
            return TallySnapshot(series=series, results=dict(self._results),
                                 tracked_clients=len(self._clients), max_clients=self.max_clients,
                                 evictions=self._evictions, status=replace(self.status))

    def export_state(self) -> dict:
        """The cumulative counters as JSON-ready data, for ``--state-file``."""
        with self._lock:
            return {
                "clients": {client: _counter_rows(entry) for client, entry in self._clients.items()},
                "other": _counter_rows(self._other),
                "results": dict(self._results),
                "evictions": self._evictions,
            }

    def prepare_restore(self, state: Mapping) -> Callable[[], None]:
        """Check counters saved by ``export_state``; return what adds them (beyond the cap: ``other``).

        Raises ValueError (or KeyError/TypeError) on data of the wrong shape, changing nothing.
        """
        restored = {str(client): _rows_to_entry(rows) for client, rows in state["clients"].items()}
        other = _rows_to_entry(state["other"])
        results = {result: int(state["results"].get(result, 0)) for result in RESULTS}
        evictions = int(state["evictions"])
        return lambda: self._restore(restored, other, results, evictions)

    def _restore(self, restored: dict, other: ClientTally, results: dict, evictions: int) -> None:
        now = self.clock()
        with self._lock:
            for client, entry in restored.items():
                target = self._clients.get(client)
                if target is None and len(self._clients) < self.max_clients:
                    target = self._clients[client] = ClientTally(now)
                for (direction, protocol), (nbytes, packets) in entry.counters.items():
                    (target or self._other).add(direction, protocol, nbytes, packets)
            for (direction, protocol), (nbytes, packets) in other.counters.items():
                self._other.add(direction, protocol, nbytes, packets)
            for result, frames in results.items():
                self._results[result] += frames
            self._evictions += evictions


def _counter_rows(entry: ClientTally) -> list:
    return [[direction, protocol, nbytes, packets] for (direction, protocol), (nbytes, packets) in entry.counters.items()]


def _rows_to_entry(rows) -> ClientTally:
    entry = ClientTally(0.0)
    for direction, protocol, nbytes, packets in rows:
        if direction not in ("in", "out") or not isinstance(protocol, str) or int(nbytes) < 0 or int(packets) < 0:
            raise ValueError(f"bad counter row {[direction, protocol, nbytes, packets]!r}")
        entry.add(direction, protocol, int(nbytes), int(packets))
    return entry

