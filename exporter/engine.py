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
from .tcpflows import FlowTable, TcpFamily, tcp_columns

IGNORED = {IGNORED_NOT_IP: NOT_IP, IGNORED_NOT_SERVER: NOT_SERVER, IGNORED_INTERNAL: INTERNAL,
           IGNORED_MALFORMED: MALFORMED}
NO_LABEL = 255
PORT_ROW = 65537  # the label table has a row per protocol, indexed by port + 1 (0: no port)
_U64 = np.uint64


def _rows_by_sorting(rows: np.ndarray, family: np.ndarray, hi: np.ndarray, lo: np.ndarray,
                     sums: BatchCounts) -> tuple[np.ndarray, BatchCounts]:
    """Rows for the frames without one (``rows`` -1): a row per distinct client, appended without bytes."""
    missing = np.flatnonzero(rows < 0)
    _, first, inverse = np.unique(np.rec.fromarrays([family[missing], hi[missing], lo[missing]]),
                                  return_index=True, return_inverse=True)
    rows = rows.copy()
    rows[missing] = len(sums.family) + inverse.reshape(-1)
    extra = missing[first]
    grown = sums._replace(family=np.concatenate([sums.family, family[extra]]),
                          hi=np.concatenate([sums.hi, hi[extra]]), lo=np.concatenate([sums.lo, lo[extra]]),
                          counts=np.concatenate([sums.counts, np.zeros((len(extra), *sums.counts.shape[1:]),
                                                                       np.int64)]))
    return rows, grown


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
                 grouping: Optional[ClientGrouping] = None, client_index_capacity: int = CLIENT_INDEX_CAPACITY,
                 tcp_flows: Optional[FlowTable] = None):
        self.tcp_flows = tcp_flows  # None: TCP health off, and nothing of it on the hot path
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
        self._tcp_columns = tcp_columns(len(self.labels))

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
        tcp_parts = []  # per family, with TCP health: its frames, which were counted, and where in the columns
        position = 0
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
            if self.tcp_flows is not None:  # the tracker skips what is not counted or not TCP
                tcp_parts.append((family, ip, dst_server, ~ignored, position, len(inbound)))
            position += len(inbound)
        index, family, hi, lo, direction, label = (np.concatenate(parts) for parts in zip(*columns))
        hi, lo = self.grouping.mask(family, hi, lo)
        sums = self._clients.sum(index, family, hi, lo, direction * len(self.labels) + label,
                                 wire_lengths[index], frame_rows=self.tcp_flows is not None)
        sums = sums._replace(counts=sums.counts.reshape(-1, 2, len(DIRECTIONS), len(self.labels)))
        if self.tcp_flows is not None:
            sums = self._tcp_health(batch, tcp_parts, label, (family, hi, lo), sums)
        sums = self.grouping.regroup(sums)  # after TCP health, which sums per address row too
        ignored = {IGNORED[code]: frames for code, frames in enumerate(np.bincount(result, minlength=SLOW + 1).tolist())
                   if code in IGNORED and frames}
        slow = np.flatnonzero(result == SLOW)
        if len(slow) == 0:
            return sums._replace(ignored=ignored)
        slowly = self._count_slowly(matcher.servers, link_type, buffer, starts, ends, wire_lengths, slow)
        for reason, frames in slowly.ignored.items():
            ignored[reason] = ignored.get(reason, 0) + frames
        return concatenate(sums._replace(ignored=ignored), slowly)

    def _tcp_health(self, batch: FrameBatch, tcp_parts: list, label: np.ndarray, clients: tuple,
                    sums: BatchCounts) -> BatchCounts:
        """``sums`` with the TCP health sums of the batch's TCP frames, per client row."""
        rows = self._clients.frame_rows
        if (rows < 0).any():  # frames the client index summed by sorting: rows of their own, no bytes
            rows, sums = _rows_by_sorting(rows, *clients, sums)
        families = []
        for family, ip, inbound, counted, position, count in tcp_parts:
            frame_rows = np.full(len(ip.index), -1, np.int64)
            frame_rows[counted] = rows[position:position + count]
            labels = np.zeros(len(ip.index), np.uint8)
            labels[counted] = label[position:position + count]
            families.append(TcpFamily(family, ip, inbound, frame_rows, labels))
        tcp = np.zeros((len(sums.family), self._tcp_columns.width), np.int64)
        table = self.tcp_flows
        table.track(batch.buffer, batch.starts, batch.wire_lengths, batch.timestamps, families, tcp,
                    self._tcp_columns)
        return sums._replace(tcp=tcp, tcp_table=(table.flows, table.evictions, table.unmeasured))

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
