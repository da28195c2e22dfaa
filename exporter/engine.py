"""The counting engine: a batch of frames in, sums per (client, direction, protocol) out, in array code.

``headers.parse_frames`` reads the header fields of the whole batch; here they meet the server set
(masks), the port labels (a flat lookup table) and the clients (``ClientIndex``). Frames of rare
shapes take the slow path: ``decode_frame`` and ``classify``, the reference implementation, one
frame at a time. The two agree frame by frame; the tests prove it.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from .classify import DIRECTIONS, INTERNAL, NOT_SERVER, OTHER_LABEL, ServerSet, classify
from .clients import (CLIENT_INDEX_CAPACITY, FAMILY_V4, FAMILY_V6, BatchCounts, ClientGrouping, ClientIndex,
                      concatenate, counts_from_mapping, empty_counts, halves)
from .decode import MALFORMED, NOT_IP, decode_frame
from .frames import FrameBatch
from .headers import (IGNORED_INTERNAL, IGNORED_MALFORMED, IGNORED_NOT_IP, IGNORED_NOT_SERVER, SLOW,
                      parse_frames)

IGNORED = {IGNORED_NOT_IP: NOT_IP, IGNORED_NOT_SERVER: NOT_SERVER, IGNORED_INTERNAL: INTERNAL,
           IGNORED_MALFORMED: MALFORMED}
NO_LABEL = 255
PORT_ROW = 65537  # the label table has a row per protocol, indexed by port + 1 (0: no port)
_U64 = np.uint64


class ServerMatcher:
    """A server set in the arrays' terms: which of many (family, hi, lo) addresses are the server's."""

    def __init__(self, servers: ServerSet):
        self.servers = servers
        self._exact_v4 = np.array([int(n.network_address) for n in servers.networks
                                   if n.version == 4 and n.num_addresses == 1], np.uint64)
        self._networks_v4 = [(_U64(int(n.netmask)), _U64(int(n.network_address)))
                             for n in servers.networks if n.version == 4 and n.num_addresses > 1]
        self._networks_v6 = [tuple(_U64(part) for part in (*halves(int(n.netmask)), *halves(int(n.network_address))))
                             for n in servers.networks if n.version == 6]

    def contains(self, family: int, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Whether each address of ``family`` is a server address."""
        if family == FAMILY_V4:
            found = np.isin(lo, self._exact_v4)
            for mask, network in self._networks_v4:
                found |= lo & mask == network
            return found
        found = np.zeros(len(lo), bool)
        for mask_hi, mask_lo, network_hi, network_lo in self._networks_v6:
            found |= (hi & mask_hi == network_hi) & (lo & mask_lo == network_lo)
        return found


class FrameCounter:
    """Counts batches of frames for one server set (which may be replaced), port map and client prefix lengths."""

    def __init__(self, servers: ServerSet, port_labels: Mapping[tuple[int, int], str], labels: Sequence[str],
                 grouping: Optional[ClientGrouping] = None, client_index_capacity: int = CLIENT_INDEX_CAPACITY):
        self._matcher = ServerMatcher(servers)
        self.port_labels = port_labels
        self.labels = tuple(labels)
        self.grouping = grouping or ClientGrouping()
        self._label_index = {label: index for index, label in enumerate(self.labels)}
        self._other = self._label_index[OTHER_LABEL]
        # label of (protocol, port + 1): one row per protocol the map names, a last row of NO_LABEL
        protocols = sorted({protocol for protocol, _ in port_labels})
        self._protocol_row = np.full(256, len(protocols) * PORT_ROW, np.int64)  # where its row starts
        self._port_label = np.full((len(protocols) + 1) * PORT_ROW, NO_LABEL, np.uint8)
        for row, protocol in enumerate(protocols):
            self._protocol_row[protocol] = row * PORT_ROW
        for (protocol, port), label in port_labels.items():
            self._port_label[self._protocol_row[protocol] + port + 1] = self._label_index[label]
        self._clients = ClientIndex(len(DIRECTIONS) * len(self.labels), client_index_capacity)

    @property
    def servers(self) -> ServerSet:
        return self._matcher.servers

    def set_servers(self, servers: ServerSet) -> None:
        """Count for ``servers`` from the next batch on (one reference swapped: any thread may call it)."""
        self._matcher = ServerMatcher(servers)

    def count(self, batch: FrameBatch) -> BatchCounts:
        """Sum a batch of frames."""
        matcher = self._matcher  # one server set for the whole batch
        link_type, buffer, starts, ends, wire_lengths = (batch.link_type, batch.buffer, batch.starts, batch.ends,
                                                         batch.wire_lengths)
        frames = len(starts)
        if frames == 0:
            return self._empty()
        parsed = parse_frames(link_type, buffer, starts, ends)
        if parsed is None:  # a link type without array code: every frame the slow way
            return self._count_slowly(matcher.servers, link_type, buffer, starts, ends, wire_lengths,
                                      np.arange(frames))
        result, families = parsed
        columns = []  # per family: frame index, client hi, client lo, direction, label
        for family, ip in zip((FAMILY_V4, FAMILY_V6), families):
            src_server = matcher.contains(family, ip.src_hi, ip.src_lo)
            dst_server = matcher.contains(family, ip.dst_hi, ip.dst_lo)
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
        sums = self.grouping.regroup(self._clients.sum(index, family, hi, lo, direction * len(self.labels) + label,
                                                       wire_lengths[index]))
        sums = sums._replace(counts=sums.counts.reshape(-1, 2, len(DIRECTIONS), len(self.labels)))
        ignored = {IGNORED[code]: frames for code, frames in enumerate(np.bincount(result, minlength=SLOW + 1).tolist())
                   if code in IGNORED and frames}
        slow = np.flatnonzero(result == SLOW)
        if len(slow) == 0:
            return sums._replace(ignored=ignored)
        slowly = self._count_slowly(matcher.servers, link_type, buffer, starts, ends, wire_lengths, slow)
        for reason, frames in slowly.ignored.items():
            ignored[reason] = ignored.get(reason, 0) + frames
        return concatenate(sums._replace(ignored=ignored), slowly)

    def _empty(self) -> BatchCounts:
        return empty_counts(len(self.labels))

    def _label(self, protocol: np.ndarray, server_port: np.ndarray, client_port: np.ndarray) -> np.ndarray:
        """The label index: the server-side port's label, else the client-side port's, else OTHER_LABEL."""
        rows = self._protocol_row[protocol] + 1
        label = self._port_label[rows + server_port]
        fallback = np.flatnonzero(label == NO_LABEL)
        label[fallback] = self._port_label[rows[fallback] + client_port[fallback]]
        label[label == NO_LABEL] = self._other
        return label

    def _count_slowly(self, servers: ServerSet, link_type: int, buffer, starts: np.ndarray, ends: np.ndarray,
                      wire_lengths: np.ndarray, which: np.ndarray) -> BatchCounts:
        """The reference path, one frame at a time, for the frames ``which``."""
        sums: dict = {}
        ignored: dict = {}
        for index in which.tolist():
            decoded = decode_frame(link_type, buffer, int(starts[index]), int(ends[index]))
            result = decoded if decoded.__class__ is str else classify(decoded, servers, self.port_labels)
            if result.__class__ is str:
                ignored[result] = ignored.get(result, 0) + 1
                continue
            total = sums.setdefault(result, [0, 0])
            total[0] += int(wire_lengths[index])
            total[1] += 1
        counts = counts_from_mapping(sums, self.labels, self.grouping)
        return counts._replace(ignored=ignored, slow_frames=len(which))
