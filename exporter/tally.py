"""The exporter's state: cumulative counters per client, exact totals, the current one-second bucket.

The capture thread is the only writer and records whole batches under one short lock; readers
(the Prometheus collector, the REST history) take copies under the same lock.

Prometheus semantics come first: ``rate()`` and ``increase()`` over the client series must never
count a byte twice. An evicted client's series simply end (nothing of its past moves anywhere);
``other`` counts only clients that were never admitted; the exact totals live in counters without
a client label, which are never evicted.
"""
from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Collection, Mapping, Optional, Sequence

from .classify import DEFAULT_PORT_LABELS, IN, OUT, protocol_labels

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
    totals: dict  # (direction, protocol) -> (bytes, packets), every counted frame
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
                 labels: Sequence[str] = protocol_labels(DEFAULT_PORT_LABELS),
                 clock: Callable[[], float] = time.monotonic):
        self.max_clients = max_clients
        self.labels = tuple(labels)
        self.client_idle_seconds = client_idle_seconds
        self.client_prefix = {4: client_prefix_v4, 16: client_prefix_v6}
        self.clock = clock
        self.status = CaptureStatus()
        self._lock = threading.Lock()
        self._clients: dict[str, ClientTally] = {}
        self._other = ClientTally(0.0)
        self._names: dict[bytes, str] = {}
        self._totals: dict[tuple[str, str], list[int]] = {}
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
            clients, bucket, names, totals = self._clients, self._bucket, self._names, self._totals
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
                # ClientTally.add, the totals and the bucket update, inlined: this loop runs per key per batch.
                counter = entry.counters.get((direction, protocol))
                if counter is None:
                    entry.counters[(direction, protocol)] = [nbytes, packets]
                else:
                    counter[0] += nbytes
                    counter[1] += packets
                counter = totals.get((direction, protocol))
                if counter is None:
                    totals[(direction, protocol)] = [nbytes, packets]
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
        # The evicted clients' series end; moving their counts into ``other`` would make every
        # eviction a phantom spike in sum(rate(...)), since Prometheus already saw those bytes.
        self._last_expiry = now
        deadline = now - self.client_idle_seconds
        idle = [client for client, entry in self._clients.items() if entry.last_seen < deadline]
        for client in idle:
            del self._clients[client]
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
            totals = {key: (nbytes, packets) for key, (nbytes, packets) in self._totals.items()}
            return TallySnapshot(series=series, totals=totals, results=dict(self._results),
                                 tracked_clients=len(self._clients), max_clients=self.max_clients,
                                 evictions=self._evictions, status=replace(self.status))

    def export_state(self) -> dict:
        """The cumulative counters as JSON-ready data, for ``--state-file``."""
        now = self.clock()
        with self._lock:
            return {
                "clients": {client: {"idle_seconds": max(0.0, now - entry.last_seen), "counters": _counter_rows(entry)}
                            for client, entry in self._clients.items()},
                "other": _counter_rows(self._other),
                "totals": [[direction, protocol, nbytes, packets]
                           for (direction, protocol), (nbytes, packets) in self._totals.items()],
                "results": dict(self._results),
                "evictions": self._evictions,
            }

    def prepare_restore(self, state: Mapping) -> Callable[[], None]:
        """Check counters saved by ``export_state``; return what puts them back.

        Raises ValueError (or KeyError/TypeError) on data of the wrong shape or range, changing
        nothing. Beyond the client cap, the clients idle the longest are left out: their series end
        as an eviction's would (moving them into ``other`` would count their bytes twice).
        """
        clients = state["clients"]
        if not isinstance(clients, dict):
            raise ValueError("clients must be a mapping")
        restored = []
        for client, saved in clients.items():
            if isinstance(saved, list):  # version 1: counter rows only
                saved = {"idle_seconds": 0.0, "counters": saved}
            idle = saved["idle_seconds"]
            if type(idle) not in (int, float) or not 0 <= idle < 1e10:
                raise ValueError(f"bad idle time {idle!r}")
            ipaddress.ip_network(client)  # ValueError unless an address or network, as labelled here
            restored.append((idle, client, _rows_to_entry(saved["counters"], self.labels)))
        restored.sort(key=lambda item: item[0])
        other = _rows_to_entry(state["other"], self.labels)
        if "totals" in state:
            totals = _rows_to_entry(state["totals"], self.labels).counters
        else:  # version 1 kept no totals; its clients and ``other`` held every counted byte
            totals = ClientTally(0.0)
            for entry in [other, *(entry for _, _, entry in restored)]:
                for (direction, protocol), (nbytes, packets) in entry.counters.items():
                    totals.add(direction, protocol, nbytes, packets)
            totals = totals.counters
        results = state["results"]
        if not isinstance(results, dict):
            raise ValueError("results must be a mapping")
        results = {result: count(results.get(result, 0)) for result in RESULTS}
        evictions = count(state["evictions"])
        return lambda: self._restore(restored, other, totals, results, evictions)

    def _restore(self, restored: list, other: ClientTally, totals: dict, results: dict, evictions: int) -> None:
        now = self.clock()
        with self._lock:
            for idle, client, entry in restored:
                if client in self._clients or len(self._clients) >= self.max_clients:
                    continue
                entry.last_seen = now - idle
                self._clients[client] = entry
            for target, source in ((self._other.counters, other.counters), (self._totals, totals)):
                for key, (nbytes, packets) in source.items():
                    counter = target.setdefault(key, [0, 0])
                    counter[0] += nbytes
                    counter[1] += packets
            for result, frames in results.items():
                self._results[result] += frames
            self._evictions += evictions


MAX_COUNT = 2 ** 63 - 1  # what a saved counter may hold; a float64 sample still shows it approximately


def count(value: object) -> int:
    """``value`` if it is an integer counter (0 to 2**63 - 1); ValueError otherwise."""
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"bad counter value {value!r}")
    return value


def _counter_rows(entry: ClientTally) -> list:
    return [[direction, protocol, nbytes, packets] for (direction, protocol), (nbytes, packets) in entry.counters.items()]


def _rows_to_entry(rows: list, labels: Collection[str]) -> ClientTally:
    if not isinstance(rows, list):
        raise ValueError("counters must be a list of rows")
    entry = ClientTally(0.0)
    for direction, protocol, nbytes, packets in rows:
        if direction not in (IN, OUT) or protocol not in labels:
            raise ValueError(f"bad counter row {[direction, protocol, nbytes, packets]!r}")
        entry.add(direction, protocol, count(nbytes), count(packets))
    return entry
