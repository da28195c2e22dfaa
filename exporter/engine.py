"""The counting engine: a batch of frames in, sums per (client, direction, protocol) out, in array code.

A batch is one buffer and, per frame, where it starts and ends in it and its length on the wire. The
common shapes -- Ethernet (or Linux cooked SLL/SLL2) with up to two VLAN tags of any TPID, raw IP,
IPv4 with or without options, fragments, IPv6 with hop-by-hop, routing, destination-options,
fragment and AH headers, TCP/UDP ports -- are read for all frames at once with numpy: header fields
are gathered from the buffer at per-frame offsets, decisions are masks, and frames are grouped by
client with one sort. Every other frame (a third VLAN tag, a truncated header, a long extension
chain, BSD loopback framing) takes the slow path: ``decode_frame`` and ``classify``, the reference
implementation, one frame at a time. The two agree frame by frame; the tests prove it.
"""
from __future__ import annotations

import ipaddress
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np

from .classify import IN, INTERNAL, NOT_SERVER, OTHER, OUT, ServerSet, classify
from .decode import (ETHERTYPE_IPV4, ETHERTYPE_IPV6, IPPROTO_AH, IPPROTO_FRAGMENT, IPPROTO_TCP, IPPROTO_UDP,
                     IPV6_EXTENSION_HEADERS, LINKTYPE_ETHERNET, LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_LINUX_SLL,
                     LINKTYPE_LINUX_SLL2, LINKTYPE_RAW, LINKTYPE_RAW_12, LINKTYPE_RAW_14, MALFORMED, NOT_IP,
                     VLAN_TPIDS, decode_frame)
from .frames import FrameBatch

DIRECTIONS = (IN, OUT)
# What happened to each frame, as a small code per frame.
COUNTED, IGNORED_NOT_IP, IGNORED_NOT_SERVER, IGNORED_INTERNAL, IGNORED_MALFORMED, SLOW = range(6)
IGNORED = {IGNORED_NOT_IP: NOT_IP, IGNORED_NOT_SERVER: NOT_SERVER, IGNORED_INTERNAL: INTERNAL,
           IGNORED_MALFORMED: MALFORMED}
# Link types read by the array code: (offset of the ethertype, offset of the first tag or the IP
# header) for ethertype framings; the IP version nibble decides for raw IP.
ETHERTYPE_FRAMINGS = {LINKTYPE_ETHERNET: (12, 14), LINKTYPE_LINUX_SLL: (14, 16), LINKTYPE_LINUX_SLL2: (0, 20)}
RAW_IP = frozenset((LINKTYPE_RAW, LINKTYPE_RAW_12, LINKTYPE_RAW_14, LINKTYPE_IPV4, LINKTYPE_IPV6))
# IPv6 extension headers followed in array code; a longer chain takes the slow path.
MAX_EXTENSION_HEADERS = 4
# Clients the counter keeps ids for between batches (at least a batch's frames); a flood of new
# addresses makes it start afresh, which costs time, never memory.
CLIENT_INDEX_CAPACITY = 1 << 16
MINIMUM_SLOTS = 1 << 10
NO_LABEL = 255
PORT_ROW = 65537  # the label table has a row per protocol, indexed by port + 1 (0: no port)
FAMILY_V4, FAMILY_V6 = 4, 6
_IS_TPID = np.zeros(65536, bool)
_IS_TPID[list(VLAN_TPIDS)] = True
_IS_CHAINED = np.zeros(256, bool)  # IPv6 next headers the walk follows
_IS_CHAINED[[*IPV6_EXTENSION_HEADERS, IPPROTO_FRAGMENT, IPPROTO_AH]] = True
_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F))
_U64 = np.uint64


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

    @property
    def counted(self) -> int:
        return int(self.counts[:, 1].sum())


ClientKey = tuple  # (family, hi, lo) as Python ints


def _halves(value: int) -> tuple[int, int]:
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
        self._mask_v6 = tuple(_U64(half) for half in _halves((2**128 - 1) << (128 - prefix_v6) & (2**128 - 1)))

    def mask(self, family: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The clients' (hi, lo) halves of the addresses ``family``, ``hi``, ``lo``."""
        if self.prefix_v4 == 32 and self.prefix_v6 == 128:
            return hi, lo
        v4 = family == FAMILY_V4
        return (np.where(v4, hi, hi & self._mask_v6[0]),
                np.where(v4, lo & self._mask_v4, lo & self._mask_v6[1]))

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
            cell: np.ndarray, wire_lengths: np.ndarray) -> BatchCounts:
        """Bytes and packets per client and cell; rows in the order clients were first seen."""
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
                    return _sum_sorting(family, hi, lo, cell, wire_lengths, None, self.cells)
            self._insert(missing[new], position, digest, family, hi, lo)
            ids[missing] = self._find(digest[missing])
        exact = (self._family[ids] == family) & (self._hi[ids] == hi) & (self._lo[ids] == lo)
        if not exact.all():  # two clients with one digest: the other one is summed by sorting
            other = np.flatnonzero(~exact)
            sorted_out = _sum_sorting(family[other], hi[other], lo[other], cell[other], wire_lengths[other],
                                      None, self.cells)
            ids, cell, wire_lengths = ids[exact], cell[exact], wire_lengths[exact]
        flat = ids * self.cells + cell
        np.add.at(self._bytes, flat, wire_lengths)
        np.add.at(self._packets, flat, 1)
        self._touched[ids] = True
        rows = np.flatnonzero(self._touched[:self._count])
        self._touched[rows] = False
        cells = (rows[:, None] * self.cells + np.arange(self.cells)).reshape(-1)
        counts = np.stack([self._bytes[cells].reshape(-1, self.cells), self._packets[cells].reshape(-1, self.cells)],
                          axis=1)
        self._bytes[cells] = self._packets[cells] = 0
        sums = BatchCounts(self._family[rows], self._hi[rows], self._lo[rows], counts, {})
        if not exact.all():
            sums = _concatenate(sums, sorted_out)
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


class FrameCounter:
    """Counts batches of frames for one server set, port map and client prefix lengths."""

    def __init__(self, servers: ServerSet, port_labels: Mapping[tuple[int, int], str], labels: Sequence[str],
                 grouping: Optional[ClientGrouping] = None, client_index_capacity: int = CLIENT_INDEX_CAPACITY):
        self.servers = servers
        self.port_labels = port_labels
        self.labels = tuple(labels)
        self.grouping = grouping or ClientGrouping()
        self._label_index = {label: index for index, label in enumerate(self.labels)}
        self._other = self._label_index[OTHER]
        self._exact_v4 = np.array([int(n.network_address) for n in servers.networks
                                   if n.version == 4 and n.num_addresses == 1], np.uint64)
        self._networks_v4 = [(_U64(int(n.netmask)), _U64(int(n.network_address)))
                             for n in servers.networks if n.version == 4 and n.num_addresses > 1]
        self._networks_v6 = [tuple(_U64(part) for part in (*_halves(int(n.netmask)), *_halves(int(n.network_address))))
                             for n in servers.networks if n.version == 6]
        # label of (protocol, port + 1): one row per protocol the map names, a last row of NO_LABEL
        protocols = sorted({protocol for protocol, _ in port_labels})
        self._protocol_row = np.full(256, len(protocols) * PORT_ROW, np.int64)  # where its row starts
        self._port_label = np.full((len(protocols) + 1) * PORT_ROW, NO_LABEL, np.uint8)
        for row, protocol in enumerate(protocols):
            self._protocol_row[protocol] = row * PORT_ROW
        for (protocol, port), label in port_labels.items():
            self._port_label[self._protocol_row[protocol] + port + 1] = self._label_index[label]
        self._clients = ClientIndex(len(DIRECTIONS) * len(self.labels), client_index_capacity)

    def count(self, batch: FrameBatch) -> BatchCounts:
        """Sum a batch of frames."""
        link_type, buffer, starts, ends, wire_lengths = (batch.link_type, batch.buffer, batch.starts, batch.ends,
                                                         batch.wire_lengths)
        frames = len(starts)
        if frames == 0:
            return self._empty()
        parsed = parse_frames(link_type, buffer, starts, ends)
        if parsed is None:  # a link type without array code: every frame the slow way
            return self._count_slowly(link_type, buffer, starts, ends, wire_lengths, np.arange(frames))
        result, families = parsed
        columns = []  # per family: frame index, client hi, client lo, direction, label
        for family, ip in zip((FAMILY_V4, FAMILY_V6), families):
            src_server = self._is_server(family, ip.src_hi, ip.src_lo)
            dst_server = self._is_server(family, ip.dst_hi, ip.dst_lo)
            ignored = src_server == dst_server
            result[ip.index[ignored]] = np.where(src_server[ignored], IGNORED_INTERNAL, IGNORED_NOT_SERVER)
            inbound = dst_server[~ignored]
            take = lambda values: values[~ignored]  # noqa: E731
            sport, dport = take(ip.sport), take(ip.dport)
            columns.append((take(ip.index), np.full(len(inbound), family, np.uint8),
                            np.where(inbound, take(ip.src_hi), take(ip.dst_hi)),
                            np.where(inbound, take(ip.src_lo), take(ip.dst_lo)),
                            np.where(inbound, 0, 1),
                            self._label(take(ip.protocol), np.where(inbound, dport, sport),
                                        np.where(inbound, sport, dport))))
        index, family, hi, lo, direction, label = (np.concatenate(parts) for parts in zip(*columns))
        hi, lo = self.grouping.mask(family, hi, lo)
        sums = self._clients.sum(index, family, hi, lo, direction * len(self.labels) + label,
                                 wire_lengths[index])
        sums = sums._replace(counts=sums.counts.reshape(-1, 2, len(DIRECTIONS), len(self.labels)))
        ignored = {IGNORED[code]: frames for code, frames in enumerate(np.bincount(result, minlength=SLOW + 1).tolist())
                   if code in IGNORED and frames}
        slow = np.flatnonzero(result == SLOW)
        if len(slow) == 0:
            return sums._replace(ignored=ignored)
        slowly = self._count_slowly(link_type, buffer, starts, ends, wire_lengths, slow)
        for reason, frames in slowly.ignored.items():
            ignored[reason] = ignored.get(reason, 0) + frames
        return BatchCounts(np.concatenate([sums.family, slowly.family]), np.concatenate([sums.hi, slowly.hi]),
                           np.concatenate([sums.lo, slowly.lo]), np.concatenate([sums.counts, slowly.counts]),
                           ignored, len(slow))

    def _empty(self) -> BatchCounts:
        return empty_counts(len(self.labels))

    def _is_server(self, family: int, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        if family == FAMILY_V4:
            found = np.isin(lo, self._exact_v4)
            for mask, network in self._networks_v4:
                found |= lo & mask == network
            return found
        found = np.zeros(len(lo), bool)
        for mask_hi, mask_lo, network_hi, network_lo in self._networks_v6:
            found |= (hi & mask_hi == network_hi) & (lo & mask_lo == network_lo)
        return found

    def _label(self, protocol: np.ndarray, server_port: np.ndarray, client_port: np.ndarray) -> np.ndarray:
        """The label index: the server-side port's label, else the client-side port's, else OTHER."""
        rows = self._protocol_row[protocol] + 1
        label = self._port_label[rows + server_port]
        fallback = np.flatnonzero(label == NO_LABEL)
        label[fallback] = self._port_label[rows[fallback] + client_port[fallback]]
        label[label == NO_LABEL] = self._other
        return label

    def _count_slowly(self, link_type: int, buffer, starts: np.ndarray, ends: np.ndarray,
                      wire_lengths: np.ndarray, which: np.ndarray) -> BatchCounts:
        """The reference path, one frame at a time, for the frames ``which``."""
        sums: dict = {}
        ignored: dict = {}
        for index in which.tolist():
            decoded = decode_frame(link_type, buffer, int(starts[index]), int(ends[index]))
            result = decoded if decoded.__class__ is str else classify(decoded, self.servers, self.port_labels)
            if result.__class__ is str:
                ignored[result] = ignored.get(result, 0) + 1
                continue
            total = sums.setdefault(result, [0, 0])
            total[0] += int(wire_lengths[index])
            total[1] += 1
        counts = counts_from_mapping(sums, self.labels, self.grouping)
        return counts._replace(ignored=ignored, slow_frames=len(which))

def empty_counts(labels: int) -> BatchCounts:
    """The sums of a batch without counted frames."""
    return BatchCounts(np.zeros(0, np.uint8), np.zeros(0, np.uint64), np.zeros(0, np.uint64),
                       np.zeros((0, 2, len(DIRECTIONS), labels), np.int64), {})


def _sum_sorting(family: np.ndarray, hi: np.ndarray, lo: np.ndarray, cell: np.ndarray, wire_lengths: np.ndarray,
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


def _concatenate(first: BatchCounts, second: BatchCounts) -> BatchCounts:
    return BatchCounts(*(np.concatenate([a, b]) for a, b in zip(first[:4], second[:4])),
                       {**first.ignored}, first.slow_frames + second.slow_frames)


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
    sums = _sum_sorting(family, hi, lo, cell, values[:, 0], values[:, 1], len(DIRECTIONS) * len(labels))
    return sums._replace(counts=sums.counts.reshape(-1, 2, len(DIRECTIONS), len(labels)))


class _Reader:
    """Big-endian fields at arbitrary byte offsets of one buffer, gathered for many frames at once."""

    def __init__(self, buffer):
        if len(buffer) < 8:
            buffer = bytes(buffer) + bytes(8)
        size = len(buffer)
        self.u8 = np.frombuffer(buffer, np.uint8)
        # Overlapping views, one byte apart: element i is the field starting at byte i.
        self.be16 = np.ndarray((size - 1,), ">u2", buffer, 0, (1,))
        self.be32 = np.ndarray((size - 3,), ">u4", buffer, 0, (1,))
        self.be64 = np.ndarray((size - 7,), ">u8", buffer, 0, (1,))
        self.size = size

    # Offsets are clipped to the buffer: a field that lies inside its frame is never clipped, and
    # a field read past a frame's end is never used.
    def u8_at(self, offsets: np.ndarray) -> np.ndarray:
        return self.u8[np.minimum(offsets, self.size - 1)]

    def u16_at(self, offsets: np.ndarray) -> np.ndarray:
        return self.be16[np.minimum(offsets, self.size - 2)]

    def u32_at(self, offsets: np.ndarray) -> np.ndarray:
        return self.be32[np.minimum(offsets, self.size - 4)]

    def u64_at(self, offsets: np.ndarray) -> np.ndarray:
        return self.be64[np.minimum(offsets, self.size - 8)].astype(np.uint64)


class IPFrames(NamedTuple):
    """Fields of the frames of one IP version that have a sound IP header, by frame index."""

    index: np.ndarray
    src_hi: np.ndarray  # IPv4: 0
    src_lo: np.ndarray
    dst_hi: np.ndarray
    dst_lo: np.ndarray
    protocol: np.ndarray  # after IPv6 extension headers
    sport: np.ndarray  # -1 when the frame carries no port the reference would read
    dport: np.ndarray


def parse_frames(link_type: int, buffer, starts: np.ndarray, ends: np.ndarray
                 ) -> Optional[tuple[np.ndarray, tuple[IPFrames, IPFrames]]]:
    """Per frame a result code, and the IPv4 and IPv6 frames' fields; None: no array code for the link type.

    The code is COUNTED for a sound IP header (to classify), IGNORED_NOT_IP, or SLOW for a frame
    the reference decodes one by one.
    """
    reader = _Reader(buffer)
    frames = len(starts)
    if link_type in ETHERTYPE_FRAMINGS:
        ethertype_at, base = ETHERTYPE_FRAMINGS[link_type]
        ethertype = reader.u16_at(starts + ethertype_at)
        network = starts + base
        tagged = np.flatnonzero(_IS_TPID[ethertype])
        if len(tagged):
            inner = reader.u16_at(starts[tagged] + base + 2)
            two_tags = _IS_TPID[inner]
            innermost = reader.u16_at(starts[tagged] + base + 6)
            ethertype[tagged] = np.where(two_tags, innermost, inner)
            network[tagged] += 4 + 4 * two_tags
            three_tags = tagged[two_tags & _IS_TPID[innermost]]
        readable = ends >= network
        result = np.where(readable, IGNORED_NOT_IP, SLOW).astype(np.uint8)
        if len(tagged):
            result[three_tags] = SLOW
            readable[three_tags] = False
        is_v4 = np.flatnonzero(readable & (ethertype == ETHERTYPE_IPV4))
        is_v6 = np.flatnonzero(readable & (ethertype == ETHERTYPE_IPV6))
    elif link_type in RAW_IP:
        network = starts
        version = np.where(ends > starts, reader.u8_at(starts) >> 4, 0)
        result = np.full(frames, SLOW, np.uint8)  # neither version: malformed, as the reference says
        is_v4 = np.flatnonzero(version == 4) if link_type != LINKTYPE_IPV6 else np.zeros(0, np.intp)
        is_v6 = np.flatnonzero(version == 6) if link_type != LINKTYPE_IPV4 else np.zeros(0, np.intp)
    else:
        return None
    v4 = _parse_ipv4(reader, is_v4, network[is_v4], ends[is_v4], result)
    v6 = _parse_ipv6(reader, is_v6, network[is_v6], ends[is_v6], result)
    return result, (v4, v6)


def _parse_ipv4(reader: _Reader, index: np.ndarray, network: np.ndarray, ends: np.ndarray,
                result: np.ndarray) -> IPFrames:
    version_ihl = reader.u8_at(network)
    header_length = (version_ihl & 0x0F).astype(np.int64) * 4
    sound = (version_ihl >> 4 == 4) & (header_length >= 20) & (ends >= network + header_length)
    result[index[~sound]] = SLOW  # malformed, as the reference says
    index, network, ends, header_length = index[sound], network[sound], ends[sound], header_length[sound]
    protocol = reader.u8_at(network + 9).astype(np.int64)
    has_ports = (reader.u16_at(network + 6) & 0x1FFF) == 0  # not a later fragment
    result[index] = COUNTED
    sport, dport = _ports(reader, network + header_length, ends, protocol, has_ports)
    zeros = np.zeros(len(index), np.uint64)
    return IPFrames(index, zeros, reader.u32_at(network + 12).astype(np.uint64), zeros,
                    reader.u32_at(network + 16).astype(np.uint64), protocol, sport, dport)


def _parse_ipv6(reader: _Reader, index: np.ndarray, network: np.ndarray, ends: np.ndarray,
                result: np.ndarray) -> IPFrames:
    sound = (reader.u8_at(network) >> 4 == 6) & (ends >= network + 40)
    result[index[~sound]] = SLOW  # malformed, as the reference says
    index, network, ends = index[sound], network[sound], ends[sound]
    protocol = reader.u8_at(network + 6).astype(np.int64)
    transport = network + 40
    has_ports = np.ones(len(index), bool)
    chained = np.flatnonzero(_IS_CHAINED[protocol])
    long_chains = _walk_extensions(reader, chained, ends, protocol, transport, has_ports)
    result[index] = COUNTED
    if len(long_chains):
        result[index[long_chains]] = SLOW
        keep = np.ones(len(index), bool)
        keep[long_chains] = False
        index, network, ends, protocol, transport, has_ports = (
            values[keep] for values in (index, network, ends, protocol, transport, has_ports))
    sport, dport = _ports(reader, transport, ends, protocol, has_ports)
    return IPFrames(index, reader.u64_at(network + 8), reader.u64_at(network + 16), reader.u64_at(network + 24),
                    reader.u64_at(network + 32), protocol, sport, dport)


def _ports(reader: _Reader, transport: np.ndarray, ends: np.ndarray, protocol: np.ndarray,
           has_ports: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source and destination ports where the reference reads them (a whole TCP or UDP header), else -1."""
    readable = has_ports & (((protocol == IPPROTO_TCP) & (ends >= transport + 20))
                            | ((protocol == IPPROTO_UDP) & (ends >= transport + 8)))
    ports = reader.u32_at(transport).astype(np.int64)
    return np.where(readable, ports >> 16, -1), np.where(readable, ports & 0xFFFF, -1)


def _walk_extensions(reader: _Reader, chained: np.ndarray, ends: np.ndarray, protocol: np.ndarray,
                     transport: np.ndarray, has_ports: np.ndarray) -> np.ndarray:
    """Follow IPv6 extension headers of the frames ``chained`` as ``decode._ipv6`` does; update in place.

    Returns the frames whose chain is longer than MAX_EXTENSION_HEADERS (for the slow path).
    """
    for _ in range(MAX_EXTENSION_HEADERS):
        if len(chained) == 0:
            return chained
        position, next_header, end = transport[chained], protocol[chained], ends[chained]
        room = end >= position + 8
        # a chain running past the captured bytes: the IP header is sound, the ports unknown
        has_ports[chained[~room]] = False
        chained, position, next_header = chained[room], position[room], next_header[room]
        header = reader.u16_at(position)
        following, length = (header >> 8).astype(np.int64), (header & 0xFF).astype(np.int64)
        fragment = next_header == IPPROTO_FRAGMENT
        later_fragment = fragment & ((reader.u16_at(position + 2) >> 3) != 0)
        protocol[chained] = following
        has_ports[chained[later_fragment]] = False
        transport[chained] = np.where(fragment, position + 8,
                                      np.where(next_header == IPPROTO_AH, position + (length + 2) * 4,
                                               position + (length + 1) * 8))
        chained = chained[~later_fragment & _IS_CHAINED[following]]
    return chained
