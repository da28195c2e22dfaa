"""Clients of the counting engine: what a client is, per-client sums of a batch, and client ids kept across batches.

A client is its address family (4 or 6) and its address, after prefix aggregation, as two unsigned
64-bit halves (IPv4: ``hi`` 0, ``lo`` the address): array code compares and hashes them cheaply.
"""
from __future__ import annotations

import ipaddress
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np

from .classify import DIRECTIONS

FAMILY_V4, FAMILY_V6 = 4, 6
# Clients ClientIndex keeps ids for between batches (at least a batch's frames); a flood of new
# addresses makes it start afresh, which costs time, never memory.
CLIENT_INDEX_CAPACITY = 1 << 16
MINIMUM_SLOTS = 1 << 10
_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F))  # odd: multiplying is a bijection
_U64 = np.uint64
ClientKey = tuple  # (family, hi, lo) as Python ints


class BatchCounts(NamedTuple):
    """Sums of one batch: per client row, bytes and packets per direction and protocol label.

    A client is its address family (4 or 6) and its address, after prefix aggregation, as two
    unsigned 64-bit halves (IPv4: ``hi`` 0, ``lo`` the address). Rows need not be distinct.
    """

    family: np.ndarray  # (clients,) uint8
    hi: np.ndarray  # (clients,) uint64
    lo: np.ndarray  # (clients,) uint64
    counts: np.ndarray  # (clients, 0 bytes | 1 packets, direction, label) int64
    ignored: dict  # ignore reason -> frames
    slow_frames: int = 0  # frames that took the slow path
    tcp: Optional[np.ndarray] = None  # (clients, tcpflows column) TCP health sums; None: TCP health off
    tcp_table: tuple = (0, 0, 0)  # TCP flow table after the batch: flows, evictions, unmeasured handshakes

    @property
    def counted(self) -> int:
        return int(self.counts[:, 1].sum())


def halves(value: int) -> tuple[int, int]:
    return value >> 64, value & 0xFFFFFFFFFFFFFFFF


def split_address(packed: bytes) -> ClientKey:
    """(family, hi, lo) of a packed 4- or 16-byte address."""
    value = int.from_bytes(packed, "big")
    return (FAMILY_V4 if len(packed) == 4 else FAMILY_V6), value >> 64, value & 0xFFFFFFFFFFFFFFFF


class ClientGrouping:
    """What a client is: the other end's address, or its network with ``--client-prefix-v4/-v6``."""

    def __init__(self, prefix_v4: int = 32, prefix_v6: int = 128):
        self.prefix_v4, self.prefix_v6 = prefix_v4, prefix_v6
        self._mask_v4 = _U64((0xFFFFFFFF << (32 - prefix_v4)) & 0xFFFFFFFF)
        self._mask_v6 = tuple(_U64(half) for half in halves((2**128 - 1) << (128 - prefix_v6) & (2**128 - 1)))

    def mask(self, family: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The clients' (hi, lo) halves of the addresses ``family``, ``hi``, ``lo``."""
        if self.prefix_v4 == 32 and self.prefix_v6 == 128:
            return hi, lo
        v4 = family == FAMILY_V4
        return (np.where(v4, hi, hi & self._mask_v6[0]),
                np.where(v4, lo & self._mask_v4, lo & self._mask_v6[1]))

    def regroup(self, sums: BatchCounts) -> BatchCounts:
        """A batch's sums per client once summed per (masked) address; other groupings (``grouping.py``) merge rows."""
        return sums

    def name(self, key: ClientKey) -> str:
        """The client label: the address (RFC 5952 for IPv6), or its network when grouped by prefix."""
        family, hi, lo = key
        if family == FAMILY_V4:
            address, prefix, full = ipaddress.IPv4Address(lo), self.prefix_v4, 32
        else:
            address, prefix, full = ipaddress.IPv6Address(hi << 64 | lo), self.prefix_v6, 128
        return str(address) if prefix == full else f"{address}/{prefix}"

    def key(self, name: str) -> Optional[ClientKey]:
        """The client a label names, or None if this grouping never gives that label."""
        try:
            network = ipaddress.ip_network(name)
        except ValueError:
            return None
        prefix = self.prefix_v4 if network.version == 4 else self.prefix_v6
        if network.prefixlen != prefix or self.name(split_address(network.network_address.packed)) != name:
            return None
        return split_address(network.network_address.packed)


class ClientIndex:
    """Dense ids for the clients of recent batches, found for all frames at once: a hash table in arrays.

    Keyed by a 64-bit digest of the client, with linear probing; each id keeps the client it stands
    for, so a lookup is checked exactly. Frames are summed per (id, cell) into accumulators that are
    read and cleared after each batch. When the ids run out, the table starts afresh.
    """

    def __init__(self, cells: int, capacity: int = CLIENT_INDEX_CAPACITY):
        self.cells, self.capacity = cells, capacity
        self._family = np.zeros(capacity, np.uint8)
        self._hi = np.zeros(capacity, np.uint64)
        self._lo = np.zeros(capacity, np.uint64)
        self._count = 0
        self._bytes = np.zeros(capacity * cells, np.int64)  # untouched pages cost no memory
        self._packets = np.zeros(capacity * cells, np.int64)
        self._touched = np.zeros(capacity, bool)
        self._size_slots(MINIMUM_SLOTS)

    def _size_slots(self, slots: int) -> None:
        """A table of ``slots`` slots (a power of two) holding the current ids: small tables stay in cache."""
        self._slots = slots
        self._slot_mask = _U64(slots - 1)
        self._slot_key = np.zeros(slots, np.uint64)
        self._slot_id = np.zeros(slots, np.int64)  # id + 1; 0 is an empty slot
        if self._count:
            ids = np.arange(self._count)
            self._place(self._digest(self._family[ids], self._hi[ids], self._lo[ids]), ids)

    @staticmethod
    def _digest(family: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        return hi * _MIX[0] ^ lo * _MIX[1] ^ family.astype(np.uint64)

    def sum(self, position: np.ndarray, family: np.ndarray, hi: np.ndarray, lo: np.ndarray,
            cell: np.ndarray, wire_lengths: np.ndarray, frame_rows: bool = False) -> BatchCounts:
        """Bytes and packets per client and cell; rows in the order clients were first seen.

        With ``frame_rows``, ``self.frame_rows`` is then each frame's row in the result (-1 for the
        rare frames summed by sorting), so other per-frame values can be summed per client alike.
        """
        self.frame_rows = None
        digest = self._digest(family, hi, lo)
        ids = self._find(digest)
        missing = np.flatnonzero(ids < 0)
        if len(missing):
            new = np.unique(digest[missing], return_index=True)[1]
            if self._count + len(new) > self.capacity:
                self._clear()
                missing = np.arange(len(ids))
                new = np.unique(digest, return_index=True)[1]
                if len(new) > self.capacity:
                    if frame_rows:
                        self.frame_rows = np.full(len(ids), -1, np.intp)
                    return sum_sorting(family, hi, lo, cell, wire_lengths, None, self.cells)
            self._insert(missing[new], position, digest, family, hi, lo)
            ids[missing] = self._find(digest[missing])
        exact = (self._family[ids] == family) & (self._hi[ids] == hi) & (self._lo[ids] == lo)
        all_ids = ids
        if not exact.all():  # two clients with one digest: the other one is summed by sorting
            other = np.flatnonzero(~exact)
            sorted_out = sum_sorting(family[other], hi[other], lo[other], cell[other], wire_lengths[other],
                                      None, self.cells)
            ids, cell, wire_lengths = ids[exact], cell[exact], wire_lengths[exact]
        flat = ids * self.cells + cell
        np.add.at(self._bytes, flat, wire_lengths)
        np.add.at(self._packets, flat, 1)
        self._touched[ids] = True
        rows = np.flatnonzero(self._touched[:self._count])
        self._touched[rows] = False
        if frame_rows:
            row_of_id = np.empty(self._count, np.int64)
            row_of_id[rows] = np.arange(len(rows))
            self.frame_rows = np.where(exact, row_of_id[all_ids], -1)
        cells = (rows[:, None] * self.cells + np.arange(self.cells)).reshape(-1)
        counts = np.stack([self._bytes[cells].reshape(-1, self.cells), self._packets[cells].reshape(-1, self.cells)],
                          axis=1)
        self._bytes[cells] = self._packets[cells] = 0
        sums = BatchCounts(self._family[rows], self._hi[rows], self._lo[rows], counts, {})
        if not exact.all():
            sums = concatenate(sums, sorted_out)
        return sums

    def _find(self, digest: np.ndarray) -> np.ndarray:
        """The id of each digest, -1 when absent."""
        ids = np.full(len(digest), -1, np.int64)
        pending = np.arange(len(digest))
        slot = (digest & self._slot_mask).astype(np.intp)
        while len(pending):
            stored = self._slot_id[slot]
            found = (stored != 0) & (self._slot_key[slot] == digest[pending])
            ids[pending[found]] = stored[found] - 1
            occupied = (stored != 0) & ~found  # another client's slot: probe the next one
            pending, slot = pending[occupied], (slot[occupied] + 1) & (self._slots - 1)
        return ids

    def _insert(self, first: np.ndarray, position: np.ndarray, digest: np.ndarray, family: np.ndarray,
                hi: np.ndarray, lo: np.ndarray) -> None:
        """Give ids to the new clients of the frames ``first``, in the order of those frames' positions."""
        first = first[np.argsort(position[first], kind="stable")]
        new = np.arange(self._count, self._count + len(first))
        self._count += len(first)
        self._family[new], self._hi[new], self._lo[new] = family[first], hi[first], lo[first]
        if 2 * self._count > self._slots:  # keep the table at most half full: short probes
            self._size_slots(max(self._slots * 2, 1 << int(2 * self._count - 1).bit_length()))
        else:
            self._place(digest[first], new)

    def _place(self, digest: np.ndarray, ids: np.ndarray) -> None:
        """Put each id in the first free slot from its digest's home slot."""
        slot = (digest & self._slot_mask).astype(np.intp)
        pending = np.arange(len(ids))
        while len(pending):  # one id per slot per round
            free = self._slot_id[slot] == 0
            _, winners = np.unique(slot[free], return_index=True)
            placed = np.flatnonzero(free)[winners]
            self._slot_id[slot[placed]] = ids[pending[placed]] + 1
            self._slot_key[slot[placed]] = digest[pending[placed]]
            left = np.ones(len(pending), bool)
            left[placed] = False
            pending, slot = pending[left], np.where(free[left], slot[left], (slot[left] + 1) & (self._slots - 1))

    def _clear(self) -> None:
        self._count = 0
        self._size_slots(MINIMUM_SLOTS)


def empty_counts(labels: int) -> BatchCounts:
    """The sums of a batch without counted frames."""
    return BatchCounts(np.zeros(0, np.uint8), np.zeros(0, np.uint64), np.zeros(0, np.uint64),
                       np.zeros((0, 2, len(DIRECTIONS), labels), np.int64), {})


def sum_sorting(family: np.ndarray, hi: np.ndarray, lo: np.ndarray, cell: np.ndarray, wire_lengths: np.ndarray,
                 packets: Optional[np.ndarray], cells: int) -> BatchCounts:
    """Sum rows per exact client by sorting; rows in the order clients first appear.

    A row is one frame, or ``packets`` frames of ``wire_lengths`` bytes in all.
    """
    _, first, inverse = np.unique(np.rec.fromarrays([family, hi, lo]), return_index=True, return_inverse=True)
    clients = len(first)
    order = np.argsort(first)
    rank = np.empty(clients, np.intp)
    rank[order] = np.arange(clients)
    first, inverse = first[order], rank[inverse.reshape(-1)]
    flat = inverse * cells + cell
    sums = np.zeros((2, clients * cells), np.int64)
    np.add.at(sums[0], flat, wire_lengths)
    np.add.at(sums[1], flat, 1 if packets is None else packets)
    counts = sums.reshape(2, clients, cells).transpose(1, 0, 2)
    return BatchCounts(family[first].astype(np.uint8), hi[first], lo[first], np.ascontiguousarray(counts), {})


def concatenate(first: BatchCounts, second: BatchCounts) -> BatchCounts:
    """The rows of both; ignored frames and TCP table figures are the first's."""
    tcp = first.tcp
    if tcp is not None or second.tcp is not None:
        width = (tcp if tcp is not None else second.tcp).shape[1]
        tcp = np.concatenate([part if part is not None else np.zeros((len(rows.family), width), np.int64)
                              for part, rows in ((first.tcp, first), (second.tcp, second))])
    return BatchCounts(*(np.concatenate([a, b]) for a, b in zip(first[:4], second[:4])),
                       {**first.ignored}, first.slow_frames + second.slow_frames, tcp, first.tcp_table)


def counts_from_mapping(sums: Mapping[tuple[bytes, str, str], Sequence[int]], labels: Sequence[str],
                        grouping: Optional[ClientGrouping] = None) -> BatchCounts:
    """BatchCounts from ``(packed client address, direction, label) -> (bytes, packets)``."""
    if not sums:
        return empty_counts(len(labels))
    keys = [split_address(packed) for packed, _direction, _label in sums]
    values = np.array(list(sums.values()), np.int64).reshape(-1, 2)
    family = np.array([k[0] for k in keys], np.uint8)
    hi, lo = (grouping or ClientGrouping()).mask(family, np.array([k[1] for k in keys], np.uint64),
                                                 np.array([k[2] for k in keys], np.uint64))
    cell = np.array([DIRECTIONS.index(d) * len(labels) + list(labels).index(p) for _, d, p in sums], np.intp)
    sums = (grouping or ClientGrouping()).regroup(
        sum_sorting(family, hi, lo, cell, values[:, 0], values[:, 1], len(DIRECTIONS) * len(labels)))
    return sums._replace(counts=sums.counts.reshape(-1, 2, len(DIRECTIONS), len(labels)))
