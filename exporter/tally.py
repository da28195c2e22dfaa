"""The exporter's state: cumulative counters per client, exact totals, and what the history takes.

Counters live in arrays, one row per client slot: (bytes | packets, direction, protocol label).
Slot 0 is ``other``. The capture thread is the only writer and adds whole batches under one short
lock; readers (the Prometheus collector, the REST history) take copies under the same lock.

Prometheus semantics come first: ``rate()`` and ``increase()`` over the client series must never
count a byte twice. An evicted client's series simply end (nothing of its past moves anywhere);
``other`` counts only clients that were never admitted; the exact totals live in counters without
a client label, which are never evicted.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from .classify import DEFAULT_PORT_LABELS, DIRECTIONS, IN, OUT, protocol_labels
from .clients import BatchCounts, ClientGrouping, ClientKey
from .tcpflows import tcp_columns

OTHER_CLIENT = "other"
RESULTS = ("counted", "not_ip", "not_server", "internal", "malformed")
OTHER_SLOT = 0
DEFAULT_MAX_CLIENTS = 500
DEFAULT_CLIENT_IDLE_SECONDS = 900
DEFAULT_MAX_TCP_FLOWS = 100_000
WINDOW_HEALTH_WIDTH = 16  # window_health: 14 round-trip buckets, segments, retransmitted
INITIAL_SLOTS = 64  # the table grows by doubling up to max_clients + 1 rows
MAX_COUNT = 2 ** 63 - 1  # what a saved counter may hold


@dataclass(frozen=True)
class TallySnapshot:
    """A consistent copy of the counters, taken at one instant."""

    labels: tuple[str, ...]
    clients: list[str]  # one per row of ``counts``; ``other`` first
    counts: np.ndarray  # (client, bytes | packets, direction, label)
    totals: np.ndarray  # (bytes | packets, direction, label): every counted frame
    results: dict  # result -> frames
    tracked_clients: int
    max_clients: int
    evictions: int
    # TCP health (None when off): per client row and in all, the sums laid out as tcpflows.tcp_columns
    tcp: Optional[np.ndarray] = None
    tcp_totals: Optional[np.ndarray] = None
    tcp_table: tuple = (0, 0, 0)  # flows, flow evictions, handshakes unmeasured
    max_tcp_flows: int = 0

    @property
    def series(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """(client, direction, protocol) -> (bytes, packets) for every series with traffic."""
        found = {}
        for row, direction, label in zip(*np.nonzero(self.counts[:, 1])):
            found[(self.clients[row], DIRECTIONS[direction], self.labels[label])] = (
                int(self.counts[row, 0, direction, label]), int(self.counts[row, 1, direction, label]))
        return found

    @property
    def total_series(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(direction, protocol) -> (bytes, packets) for every pair with traffic."""
        return {(DIRECTIONS[direction], self.labels[label]): (int(self.totals[0, direction, label]),
                                                             int(self.totals[1, direction, label]))
                for direction, label in zip(*np.nonzero(self.totals[1]))}


class Bucket(NamedTuple):
    """What was counted since the previous ``take_bucket``."""

    totals: np.ndarray  # (bytes | packets, direction, label), exact
    clients: list[str]
    counts: np.ndarray  # (client, direction, label) -> bytes
    health: Optional[np.ndarray] = None  # (client, window_health column); None: TCP health off


def window_health(tcp: np.ndarray, labels: int) -> np.ndarray:
    """What the REST history keeps of TCP health rows (clients, tcp_columns): round trips per bucket,
    then payload segments and retransmitted ones, both directions together (WINDOW_HEALTH_WIDTH columns)."""
    columns = tcp_columns(labels)
    return np.concatenate([tcp[:, columns.rtt_buckets:columns.rtt_sum_ns],
                           tcp[:, columns.segments:columns.segments + 2].sum(axis=1, keepdims=True),
                           tcp[:, columns.retransmitted:columns.retransmitted + 2].sum(axis=1, keepdims=True)],
                          axis=1)


class Tally:
    """Cumulative per-client counters in a bounded client table, exact totals, and the bucket since the last take."""

    def __init__(self, *, max_clients: int = DEFAULT_MAX_CLIENTS, client_idle_seconds: float = DEFAULT_CLIENT_IDLE_SECONDS,
                 grouping: Optional[ClientGrouping] = None,
                 labels: Sequence[str] = protocol_labels(DEFAULT_PORT_LABELS),
                 clock: Callable[[], float] = time.monotonic, max_tcp_flows: Optional[int] = None,
                 on_admit: Optional[Callable[[str], None]] = None):
        self.max_clients = max_clients
        self.max_tcp_flows = max_tcp_flows  # None: TCP health off
        self.on_admit = on_admit  # told each newly tracked client's label, under the lock: must not block
        self.client_idle_seconds = client_idle_seconds
        self.grouping = grouping or ClientGrouping()
        self.labels = tuple(labels)
        self.clock = clock
        self._lock = threading.Lock()
        self._cell_shape = (2, len(DIRECTIONS), len(self.labels))
        slots = min(INITIAL_SLOTS, max_clients + 1)
        self._counts = np.zeros((slots, *self._cell_shape), np.int64)
        self._taken = np.zeros_like(self._counts)  # counts at the last take_bucket
        self._last_seen = np.zeros(slots)
        self._slot_of: dict[ClientKey, int] = {}
        self._keys: list[Optional[ClientKey]] = [None] * slots  # per slot; None: free (or ``other``)
        self._names: list[str] = [OTHER_CLIENT] + [""] * (slots - 1)
        self._free = list(range(slots - 1, 0, -1))
        self._totals = np.zeros(self._cell_shape, np.int64)
        self._taken_totals = np.zeros_like(self._totals)
        # evicted since the last take: name, bytes, TCP health (None when off)
        self._evicted_detail: list[tuple[str, np.ndarray, Optional[np.ndarray]]] = []
        self._results = dict.fromkeys(RESULTS, 0)
        self._evictions = 0
        self._tcp_columns = tcp_columns(len(self.labels))
        self._tcp = np.zeros((slots, self._tcp_columns.width), np.int64) if max_tcp_flows is not None else None
        self._taken_tcp = None if self._tcp is None else np.zeros_like(self._tcp)  # at the last take_bucket
        self._tcp_totals = np.zeros(self._tcp_columns.width, np.int64)
        self._tcp_table = (0, 0, 0)
        self._last_expiry = clock()

    def record(self, batch: BatchCounts) -> None:
        """Add one batch's sums and ignored frames."""
        now = self.clock()
        with self._lock:
            for reason, frames in batch.ignored.items():
                self._results[reason] += frames
            if len(batch.family):
                slot_of = self._slot_of
                slots = np.array([slot_of.get(key) or self._admit(key, now) for key in
                                  zip(batch.family.tolist(), batch.hi.tolist(), batch.lo.tolist())], np.intp)
                np.add.at(self._counts, slots, batch.counts)
                self._last_seen[slots] = now
                totals = batch.counts.sum(axis=0)
                self._totals += totals
                self._results["counted"] += int(totals[1].sum())
                if batch.tcp is not None and self._tcp is not None:
                    np.add.at(self._tcp, slots, batch.tcp)
                    self._tcp_totals += batch.tcp.sum(axis=0)
                    self._tcp_table = batch.tcp_table
            if now - self._last_expiry >= 1.0:
                self._expire(now)

    def _admit(self, key: ClientKey, now: float) -> int:
        """A slot for a new client, or OTHER_SLOT when the table is full."""
        if not self._free:
            if len(self._slot_of) >= self.max_clients:
                return OTHER_SLOT
            self._grow()
        slot = self._free.pop()
        self._slot_of[key] = slot
        self._keys[slot] = key
        self._names[slot] = self.grouping.name(key)
        self._last_seen[slot] = now
        if self.on_admit is not None:
            self.on_admit(self._names[slot])
        return slot

    def _grow(self) -> None:
        old = len(self._keys)
        new = min(old * 2, self.max_clients + 1)
        for name in ("_counts", "_taken", "_last_seen") + (("_tcp", "_taken_tcp") if self._tcp is not None else ()):
            rows = getattr(self, name)
            setattr(self, name, np.concatenate([rows, np.zeros((new - old, *rows.shape[1:]), rows.dtype)]))
        self._keys += [None] * (new - old)
        self._names += [""] * (new - old)
        self._free = list(range(new - 1, old - 1, -1))

    def expire(self) -> None:
        """Evict idle clients; called by the capture loop when no traffic arrives."""
        with self._lock:
            self._expire(self.clock())

    def _expire(self, now: float) -> None:
        # The evicted clients' series end; moving their counts into ``other`` would make every
        # eviction a phantom spike in sum(rate(...)), since Prometheus already saw those bytes.
        self._last_expiry = now
        idle = np.flatnonzero(self._last_seen < now - self.client_idle_seconds).tolist()
        for slot in idle:
            key = self._keys[slot]
            if key is None:
                continue
            unseen = self._counts[slot, 0] - self._taken[slot, 0]
            if unseen.any():  # counted since the last take: the history still gets it
                self._evicted_detail.append((self._names[slot], unseen, None if self._tcp is None
                                             else self._tcp[slot] - self._taken_tcp[slot]))
            self._counts[slot] = self._taken[slot] = 0
            if self._tcp is not None:
                self._tcp[slot] = self._taken_tcp[slot] = 0
            del self._slot_of[key]
            self._keys[slot] = None
            self._free.append(slot)
            self._evictions += 1

    def take_bucket(self) -> Bucket:
        """What was counted since the previous call: exact totals, bytes per client, and with TCP
        health each client's ``window_health``."""
        with self._lock:
            totals = self._totals - self._taken_totals
            self._taken_totals = self._totals.copy()
            delta = self._counts[:, 0] - self._taken[:, 0]
            rows = np.flatnonzero(delta.any(axis=(1, 2)))
            np.copyto(self._taken, self._counts)
            tcp = None
            if self._tcp is not None:  # a TCP event always comes with its frame's bytes: same rows
                tcp = (self._tcp - self._taken_tcp)[rows]
                np.copyto(self._taken_tcp, self._tcp)
            evicted, self._evicted_detail = self._evicted_detail, []
        names = [self._names[row] for row in rows.tolist()]
        counts = delta[rows]
        if evicted:  # a client evicted, and maybe back, within the second: one row per name
            index = {name: row for row, name in enumerate(names)}
            extra, extra_tcp = [], []
            for name, detail, health in evicted:
                if name in index:
                    counts[index[name]] += detail
                    if tcp is not None:
                        tcp[index[name]] += health
                else:
                    index[name] = len(names)
                    names.append(name)
                    extra.append(detail)
                    extra_tcp.append(health)
            counts = np.concatenate([counts, np.array(extra, np.int64).reshape(-1, *self._cell_shape[1:])])
            if tcp is not None:
                tcp = np.concatenate([tcp, np.array(extra_tcp, np.int64).reshape(-1, self._tcp_columns.width)])
        return Bucket(totals, names, counts, None if tcp is None else window_health(tcp, len(self.labels)))

    def snapshot(self) -> TallySnapshot:
        """Copy the cumulative counters consistently."""
        with self._lock:
            rows = [OTHER_SLOT] + sorted(self._slot_of.values())
            return TallySnapshot(labels=self.labels, clients=[self._names[row] for row in rows],
                                 counts=self._counts[rows], totals=self._totals.copy(), results=dict(self._results),
                                 tracked_clients=len(self._slot_of), max_clients=self.max_clients,
                                 evictions=self._evictions,
                                 tcp=None if self._tcp is None else self._tcp[rows],
                                 tcp_totals=None if self._tcp is None else self._tcp_totals.copy(),
                                 tcp_table=self._tcp_table, max_tcp_flows=self.max_tcp_flows or 0)

    def export_state(self) -> dict:
        """The cumulative counters as JSON-ready data, for ``--state-file``."""
        now = self.clock()
        with self._lock:
            return {
                "clients": {self._names[slot]: {"idle_seconds": max(0.0, now - float(self._last_seen[slot])),
                                                "counters": self._rows(self._counts[slot])}
                            for slot in self._slot_of.values()},
                "other": self._rows(self._counts[OTHER_SLOT]),
                "totals": self._rows(self._totals),
                "results": dict(self._results),
                "evictions": self._evictions,
                **({} if self._tcp is None else {"tcp": {
                    "clients": {self._names[slot]: self._health(self._tcp[slot]) for slot in self._slot_of.values()
                                if self._tcp[slot].any()},
                    "other": self._health(self._tcp[OTHER_SLOT]), "totals": self._health(self._tcp_totals)}}),
            }

    def _health(self, row: np.ndarray) -> dict:
        """One TCP health row as named counters (the column layout may change between versions)."""
        columns = self._tcp_columns
        pair = lambda first: [int(row[first]), int(row[first + 1])]  # noqa: E731
        return {"handshakes": {label: int(row[columns.handshakes + index]) for index, label in enumerate(self.labels)
                               if row[columns.handshakes + index]},
                "rtt_buckets": row[columns.rtt_buckets:columns.rtt_sum_ns].tolist(),
                "rtt_sum_ns": int(row[columns.rtt_sum_ns]), "segments": pair(columns.segments),
                "retransmitted": pair(columns.retransmitted), "resets": pair(columns.resets)}

    def _health_row(self, saved: object) -> np.ndarray:
        """The row ``_health`` saved; ValueError on any other shape or value."""
        columns = self._tcp_columns
        if not isinstance(saved, dict) or set(saved) != {"handshakes", "rtt_buckets", "rtt_sum_ns", "segments",
                                                         "retransmitted", "resets"}:
            raise ValueError("bad TCP health counters")
        row = np.zeros(columns.width, np.int64)
        handshakes = saved["handshakes"]
        if not isinstance(handshakes, dict) or not set(handshakes) <= set(self.labels):
            raise ValueError(f"bad TCP handshakes {handshakes!r}")
        for label, value in handshakes.items():
            row[columns.handshakes + self.labels.index(label)] = count(value)
        buckets = saved["rtt_buckets"]
        if not isinstance(buckets, list) or len(buckets) != columns.rtt_sum_ns - columns.rtt_buckets:
            raise ValueError(f"bad TCP round-trip buckets {buckets!r}")
        row[columns.rtt_buckets:columns.rtt_sum_ns] = [count(value) for value in buckets]
        row[columns.rtt_sum_ns] = count(saved["rtt_sum_ns"])
        for name in ("segments", "retransmitted", "resets"):
            pair = saved[name]
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError(f"bad TCP {name} {pair!r}")
            first = getattr(columns, name)
            row[first:first + 2] = [count(value) for value in pair]
        return row

    def _rows(self, cells: np.ndarray) -> list:
        return [[DIRECTIONS[direction], self.labels[label], int(cells[0, direction, label]),
                 int(cells[1, direction, label])] for direction, label in zip(*np.nonzero(cells[1]))]

    def _cells(self, rows: object) -> np.ndarray:
        if not isinstance(rows, list):
            raise ValueError("counters must be a list of rows")
        cells = np.zeros(self._cell_shape, np.int64)
        for direction, protocol, nbytes, packets in rows:
            if direction not in (IN, OUT) or protocol not in self.labels:
                raise ValueError(f"bad counter row {[direction, protocol, nbytes, packets]!r}")
            cell = (DIRECTIONS.index(direction), self.labels.index(protocol))
            cells[(0, *cell)] += count(nbytes)
            cells[(1, *cell)] += count(packets)
        return cells

    def prepare_restore(self, state: Mapping) -> Callable[[], None]:
        """Check counters saved by ``export_state``; return what puts them back.

        Raises ValueError (or KeyError/TypeError) on data of the wrong shape or range, changing
        nothing. Clients beyond the cap (the idlest first), or labelled by another prefix length,
        are left out: their series end as an eviction's would (moving them into ``other`` would
        count their bytes twice).
        """
        clients = state["clients"]
        if not isinstance(clients, dict):
            raise ValueError("clients must be a mapping")
        restored = []
        for name, saved in clients.items():
            if isinstance(saved, list):  # version 1: counter rows only
                saved = {"idle_seconds": 0.0, "counters": saved}
            idle = saved["idle_seconds"]
            if type(idle) not in (int, float) or not 0 <= idle < 1e10:
                raise ValueError(f"bad idle time {idle!r}")
            if not isinstance(name, str) or ":" not in name and "." not in name and self.grouping.key(name) is None:
                raise ValueError(f"bad client {name!r}")
            restored.append((idle, name, self._cells(saved["counters"])))
        restored.sort(key=lambda item: item[0])
        other = self._cells(state["other"])
        if "totals" in state:
            totals = self._cells(state["totals"])
        else:  # version 1 kept no totals; its clients and ``other`` held every counted byte
            totals = other + sum((cells for _, _, cells in restored), np.zeros(self._cell_shape, np.int64))
        results = state["results"]
        if not isinstance(results, dict):
            raise ValueError("results must be a mapping")
        results = {result: count(results.get(result, 0)) for result in RESULTS}
        evictions = count(state["evictions"])
        health = self._prepare_health(state.get("tcp"), {name for _, name, _ in restored})
        return lambda: self._restore(restored, other, totals, results, evictions, health)

    def _prepare_health(self, saved: object, clients: set) -> Optional[tuple[dict, np.ndarray, np.ndarray]]:
        """TCP health saved by a version 3 file: (client rows, other, totals); None when absent or off."""
        if saved is None or self._tcp is None:
            return None
        if not isinstance(saved, dict) or not isinstance(saved.get("clients"), dict):
            raise ValueError("bad TCP health part")
        rows = {}
        for name, values in saved["clients"].items():
            if name not in clients:
                raise ValueError(f"TCP health for {name!r}, a client without counters")
            rows[name] = self._health_row(values)
        return rows, self._health_row(saved["other"]), self._health_row(saved["totals"])

    def _restore(self, restored: list, other: np.ndarray, totals: np.ndarray, results: dict, evictions: int,
                 health: Optional[tuple[dict, np.ndarray, np.ndarray]] = None) -> None:
        now = self.clock()
        with self._lock:
            for idle, name, cells in restored:
                key = self.grouping.key(name)
                if key is None or key in self._slot_of:
                    continue
                slot = self._admit(key, now - idle)
                if slot == OTHER_SLOT:
                    break
                self._counts[slot] += cells
                self._taken[slot] += cells  # restored counts are no new traffic for the history
                if health is not None and name in health[0]:
                    self._tcp[slot] += health[0][name]
                    self._taken_tcp[slot] += health[0][name]
            for target in (self._counts[OTHER_SLOT], self._taken[OTHER_SLOT]):
                target += other
            self._totals += totals
            self._taken_totals += totals
            for result, frames in results.items():
                self._results[result] += frames
            self._evictions += evictions
            if health is not None:
                self._tcp[OTHER_SLOT] += health[1]
                self._taken_tcp[OTHER_SLOT] += health[1]
                self._tcp_totals += health[2]


def count(value: object) -> int:
    """``value`` if it is an integer counter (0 to 2**63 - 1); ValueError otherwise."""
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"bad counter value {value!r}")
    return value
