"""TCP connection state for TCP health: handshakes and their round trip, retransmitted and new payload segments.

Connection state is sequential per flow, so no array code can keep it: ``native/walk.c``
(``tcp_track``) walks the TCP frames of a batch in capture order over a fixed-capacity hash table
with an exact LRU list, all in arrays this object preallocates, reads their TCP headers in place
and adds their events straight into the per-client sums (building per-frame arrays in numpy for
the same work cost more than the tracking itself); without the compiled library the same algorithm
runs in Python (an ``OrderedDict`` as table and LRU), with identical results -- the tests prove it.

Only frames that can matter touch a flow: SYNs in, SYN-ACKs out, payload segments, and bare ACKs in
(one may complete a handshake; a bare ACK of an unknown flow creates nothing). RST segments are
counted as resets and touch no flow.

A flow is (client address, server address, client port, server port), whatever the direction.
Per frame the result is a set of ``EVENT_*`` bits and, with ``EVENT_RTT``, the time from the
server's last SYN-ACK to the client's ACK completing the handshake. Payload segments are new unless
their whole sequence range was already seen in their direction: per direction the highest sequence
number seen plus up to ``HOLES`` ranges not yet seen below it (so a reordered segment that fills a
hole is new data; with more holes the one furthest behind is forgotten). A keep-alive (at most one
byte at the highest sequence number minus one) is no segment at all. SYN segments are never payload
segments; the connection's state starts at a client's SYN or at the first payload segment seen.
Frame times are taken to the microsecond: batches carry them as float seconds, which hold epoch
times to about 0.24 us, so rounding to the microsecond gives microsecond captures' times exactly.
"""
from __future__ import annotations

import collections
import ctypes
import math
from typing import NamedTuple, Optional, Sequence

import numpy as np

from .headers import IPFrames, tcp_fields
from .walk import native_library

HOLES = 4
# traffic_client_tcp_handshake_rtt_seconds buckets (upper bounds, seconds; +Inf follows)
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RTT_BOUNDS_NS = np.array([round(bound * 1e9) for bound in RTT_BUCKETS], np.int64)
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
EVENT_SEGMENT, EVENT_RETRANSMISSION, EVENT_HANDSHAKE, EVENT_RTT, EVENT_RESET = 1, 2, 4, 8, 16
NO_TIME = np.iinfo(np.int64).min  # a frame recorded without a timestamp
IN, OUT = 0, 1
_STAGE_NONE, _STAGE_SYN, _STAGE_SYN_ACK = 0, 1, 2
_HOLE_ROOM = HOLES + 1
_MASK32 = 0xFFFFFFFF


class _Table(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("capacity", "slots", "count", "head", "tail", "evictions",
                                                      "unmeasured")] + [("slot", ctypes.c_void_p),
                                                                        ("flows", ctypes.c_void_p)]


class TcpColumns(NamedTuple):
    """Where each TCP health counter sits in a client's row of sums (``width`` columns in all).

    Handshakes per protocol label; handshake round trips per bucket (not cumulative, ``+Inf`` last)
    and their sum in ns; payload segments, retransmitted ones and resets per direction (in, out).
    """

    handshakes: int
    rtt_buckets: int
    rtt_sum_ns: int
    segments: int
    retransmitted: int
    resets: int
    width: int


def tcp_columns(labels: int) -> TcpColumns:
    """The column layout for ``labels`` protocol labels."""
    rtt = labels
    rtt_sum = rtt + len(RTT_BUCKETS) + 1
    return TcpColumns(0, rtt, rtt_sum, rtt_sum + 1, rtt_sum + 3, rtt_sum + 5, rtt_sum + 7)


def rtt_quantile(quantile: float, buckets: Sequence[int]) -> Optional[float]:
    """The ``quantile`` of round trips from per-bucket counts (``RTT_BUCKETS`` then +Inf), as Prometheus's
    ``histogram_quantile`` estimates it: linear within the bucket; beyond the last bound, that bound.
    None without observations."""
    total = sum(buckets)
    if total == 0:
        return None
    rank, below = quantile * total, 0
    for index, count in enumerate(buckets):
        if count and below + count >= rank:
            if index == len(RTT_BUCKETS):
                return RTT_BUCKETS[-1]
            lower = RTT_BUCKETS[index - 1] if index else 0.0
            return lower + (RTT_BUCKETS[index] - lower) * (rank - below) / count
        below += count
    return RTT_BUCKETS[-1]


class TcpFamily(NamedTuple):
    """One IP family's frames of a batch, as the engine counted them."""

    family: int  # 4 or 6
    frames: IPFrames
    inbound: np.ndarray  # bool: client to server
    rows: np.ndarray  # int64: the client's row in the batch's sums; -1: not counted
    labels: np.ndarray  # uint8: the protocol label index


class _Family(ctypes.Structure):
    _fields_ = [("count", ctypes.c_long), ("family", ctypes.c_int64)] + [
        (name, ctypes.c_void_p) for name in ("index", "protocol", "sport", "dport", "network", "transport", "row",
                                             "src_hi", "src_lo", "dst_hi", "dst_lo", "inbound", "label", "events",
                                             "rtt")]


class _Batch(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("buffer", "starts", "wire_lengths", "times", "sums")] + [
        (name, ctypes.c_int64) for name in ("width", "handshakes", "rtt_buckets", "rtt_sum", "segments",
                                            "retransmitted", "resets", "bound_count")] + [("bounds", ctypes.c_void_p)]


class FlowTable:
    """TCP connections of at most ``capacity`` flows; the least recently seen flow makes room for a new one."""

    def __init__(self, capacity: int, native: bool = True):
        if capacity < 1:
            raise ValueError("a flow table needs room for at least one flow")
        self.capacity = capacity
        self._library = native_library() if native else None
        self._python_flows: collections.OrderedDict = collections.OrderedDict()
        self._python_evictions = self._python_unmeasured = 0
        if self._library is not None:
            self._library.tcp_track.restype = None
            self._library.tcp_track.argtypes = [ctypes.POINTER(_Table), ctypes.POINTER(_Batch),
                                                ctypes.POINTER(_Family), ctypes.POINTER(_Family), ctypes.c_void_p]
            self._library.tcp_scratch_size.restype = ctypes.c_long
            self._scratch = np.zeros(0, np.uint8)
            self._library.tcp_flow_size.restype = ctypes.c_long
            slots = 1 << max(4, (2 * capacity - 1).bit_length())  # at most half full: short probes
            self._slots = np.zeros(slots, np.uint64)
            record = self._library.tcp_flow_size()
            self._flows = np.zeros(capacity * record + 64, np.uint8)  # pages are zeroed as they are first used
            aligned = -self._flows.ctypes.data % 64  # the records are 64-byte aligned, like cache lines
            self._table = _Table(capacity, slots, 0, -1, -1, 0, 0, self._slots.ctypes.data,
                                 self._flows.ctypes.data + aligned)

    @property
    def native(self) -> bool:
        return self._library is not None

    @property
    def flows(self) -> int:
        """Flows in the table now."""
        return self._table.count if self.native else len(self._python_flows)

    @property
    def evictions(self) -> int:
        """Flows evicted to make room, since the start."""
        return self._table.evictions if self.native else self._python_evictions

    @property
    def unmeasured(self) -> int:
        """Flows evicted while their handshake was incomplete, since the start."""
        return self._table.unmeasured if self.native else self._python_unmeasured

    def track(self, buffer, starts: np.ndarray, wire_lengths: np.ndarray, times: Optional[np.ndarray],
              families: Sequence[TcpFamily], sums: np.ndarray, columns: TcpColumns) -> list[tuple[np.ndarray, np.ndarray]]:
        """Track the TCP frames of a batch in capture order; add their events to ``sums`` (rows x columns.width).

        ``times`` are the batch's frame times in seconds (NaN: unknown; None: none). Returns per family
        each frame's EVENT_* bits (uint8) and handshake round trip in ns (int64, where EVENT_RTT).
        """
        results = [(np.zeros(len(part.rows), np.uint8), np.zeros(len(part.rows), np.int64)) for part in families]
        if self.native:
            keep = []  # what the structures point into lives until the call returns

            def pointer(values, dtype):
                values = np.ascontiguousarray(values, dtype)
                keep.append(values)
                return values.ctypes.data

            parts = []
            for part, (events, rtt) in zip(families, results):
                ip = part.frames
                parts.append(_Family(len(part.rows), part.family, *(pointer(values, np.int64) for values in (
                    ip.index, ip.protocol, ip.sport, ip.dport, ip.network, ip.transport, part.rows)),
                    *(pointer(values, np.uint64) for values in (ip.src_hi, ip.src_lo, ip.dst_hi, ip.dst_lo)),
                    pointer(part.inbound, np.bool_), pointer(part.labels, np.uint8), events.ctypes.data,
                    rtt.ctypes.data))
            assert sums.flags.c_contiguous and sums.dtype == np.int64
            batch = _Batch(np.frombuffer(buffer, np.uint8).ctypes.data if len(buffer) else 0,
                           pointer(starts, np.int64), pointer(wire_lengths, np.int64),
                           None if times is None else pointer(times, np.float64), sums.ctypes.data,
                           columns.width, columns.handshakes, columns.rtt_buckets, columns.rtt_sum_ns,
                           columns.segments, columns.retransmitted, columns.resets, len(RTT_BOUNDS_NS),
                           RTT_BOUNDS_NS.ctypes.data)
            frames = sum(len(part.rows) for part in families)
            if len(self._scratch) < frames * self._library.tcp_scratch_size():
                self._scratch = np.zeros(frames * self._library.tcp_scratch_size(), np.uint8)
            self._library.tcp_track(ctypes.byref(self._table), ctypes.byref(batch), *map(ctypes.byref, parts),
                                    self._scratch.ctypes.data)
        else:
            self._track_in_python(buffer, starts, wire_lengths, times, families, sums, columns, results)
        return results

    def _track_in_python(self, buffer, starts, wire_lengths, times, families, sums, columns, results) -> None:
        """tcp_track of walk.c, frame by frame, in the same order and with the same results."""
        merged, fields = [], []
        for number, part in enumerate(families):
            ip = part.frames
            read = tcp_fields(buffer, part.family == 6, starts[ip.index], ip.network, ip.transport,
                              wire_lengths[ip.index])
            merged += [(frame, number, i) for i, frame in enumerate(ip.index.tolist())]
            fields.append((read.flags.tolist(), read.seq.tolist(), read.ack.tolist(), read.payload.tolist(),
                           read.sound.tolist()))
        merged.sort()
        for frame, number, i in merged:
            part, (events, rtt) = families[number], results[number]
            ip = part.frames
            row = int(part.rows[i])
            flags, seq, ack, payload, sound = (values[i] for values in fields[number])
            if row < 0 or ip.protocol[i] != 6 or ip.sport[i] < 0 or not sound:
                continue
            direction = IN if part.inbound[i] else OUT
            cells = sums[row]
            if flags & RST:
                cells[columns.resets + direction] += 1
                events[i] = EVENT_RESET
                continue
            if flags & SYN:
                candidate = (direction == IN) != bool(flags & ACK)
            else:
                candidate = payload > 0 or (direction == IN and flags & ACK)
            if not candidate:
                continue
            ends = [(int(ip.src_hi[i]), int(ip.src_lo[i])), (int(ip.dst_hi[i]), int(ip.dst_lo[i]))]
            ports = [int(ip.sport[i]), int(ip.dport[i])]
            if direction == OUT:
                ends.reverse()
                ports.reverse()
            key = (*ends[0], *ends[1], part.family << 32 | ports[0] << 16 | ports[1])
            time = NO_TIME
            if times is not None and not math.isnan(times[frame]):
                time = int(float(times[frame]) * 1e6 + 0.5) * 1000  # as walk.c: to the microsecond
            found, elapsed = self._track_frame(key, direction, flags, seq, ack, payload, time)
            events[i] = found
            if found & EVENT_SEGMENT:
                cells[columns.segments + direction] += 1
            if found & EVENT_RETRANSMISSION:
                cells[columns.retransmitted + direction] += 1
            if found & EVENT_HANDSHAKE:
                cells[columns.handshakes + int(part.labels[i])] += 1
            if found & EVENT_RTT:
                cells[columns.rtt_buckets + int(np.searchsorted(RTT_BOUNDS_NS, elapsed))] += 1
                cells[columns.rtt_sum_ns] += elapsed
                rtt[i] = elapsed

    def _track_frame(self, key: tuple, direction: int, flags: int, seq: int, ack: int, payload: int,
                     time: int) -> tuple[int, int]:
        """track_frame of walk.c: (EVENT_* bits, round trip in ns)."""
        table = self._python_flows
        flow = table.get(key)
        if flags & SYN:
            if direction == IN and not flags & ACK:
                if flow is None:
                    flow = self._insert(key)
                else:
                    table.move_to_end(key)
                if flow.stage == _STAGE_NONE or flow.client_isn != seq:
                    flow.reset()
                    flow.stage, flow.client_isn = _STAGE_SYN, seq
                    flow.directions[IN] = _Direction((seq + 1) & _MASK32)
            elif direction == OUT and flags & ACK and flow is not None:
                table.move_to_end(key)
                if flow.stage != _STAGE_NONE and ack == (flow.client_isn + 1) & _MASK32:
                    flow.stage, flow.server_isn, flow.synack_time = _STAGE_SYN_ACK, seq, time
                    flow.directions[OUT] = _Direction((seq + 1) & _MASK32)
            return 0, 0
        found = flow is not None
        if not found:
            if payload == 0:
                return 0, 0
            flow = self._insert(key)
        else:
            table.move_to_end(key)
        events = elapsed = 0
        if (found and flow.stage == _STAGE_SYN_ACK and direction == IN and flags & ACK
                and ack == (flow.server_isn + 1) & _MASK32):
            flow.stage = _STAGE_NONE
            events = EVENT_HANDSHAKE
            if time != NO_TIME and flow.synack_time != NO_TIME:
                elapsed = max(0, time - flow.synack_time)
                events |= EVENT_RTT
        if payload > 0:
            state = flow.directions[direction]
            if state is None:
                flow.directions[direction] = _Direction((seq + payload) & _MASK32)
                events |= EVENT_SEGMENT
            else:
                events |= state.segment(seq, payload)
        return events, elapsed

    def _insert(self, key: tuple) -> "_Flow":
        if len(self._python_flows) >= self.capacity:
            _, evicted = self._python_flows.popitem(last=False)
            self._python_evictions += 1
            if evicted.stage != _STAGE_NONE:
                self._python_unmeasured += 1
        flow = self._python_flows[key] = _Flow()
        return flow


class _Flow:
    __slots__ = ("stage", "client_isn", "server_isn", "synack_time", "directions")

    def __init__(self):
        self.client_isn = self.server_isn = self.synack_time = 0
        self.reset()

    def reset(self) -> None:
        self.stage = _STAGE_NONE
        self.directions = [None, None]


def _relative(value: int, high: int) -> int:
    """``value - high`` modulo 2**32, as a signed 32-bit number."""
    difference = (value - high) & _MASK32
    return difference - (1 << 32) if difference >= 1 << 31 else difference


class _Direction:
    """One direction's sequence space: the highest sequence number seen + 1, and holes below it."""

    __slots__ = ("high", "holes")

    def __init__(self, high: int):
        self.high = high
        self.holes: list[list[int]] = []  # [start, end), in the order the C code keeps them

    def segment(self, seq: int, length: int) -> int:
        end = (seq + length) & _MASK32
        high = self.high
        if length <= 1 and (high - seq) & _MASK32 == 1:
            return 0  # a keep-alive
        if _relative(end, high) > 0:
            if _relative(seq, high) > 0:
                self.holes.append([high, seq])
            else:
                self._fill(seq, high, high)
            self.high = end
            self._trim(end)
            return EVENT_SEGMENT
        if self._fill(seq, end, high):
            return EVENT_SEGMENT
        return EVENT_SEGMENT | EVENT_RETRANSMISSION

    def _trim(self, high: int) -> None:
        if len(self.holes) <= HOLES:
            return
        lowest = min(range(len(self.holes)), key=lambda i: (_relative(self.holes[i][0], high), i))
        self.holes[lowest] = self.holes[-1]
        self.holes.pop()

    def _fill(self, start: int, end: int, high: int) -> bool:
        """Remove [start, end) from the holes; whether it overlapped any (mirrors holes_fill in walk.c)."""
        holes, overlapped = self.holes, False
        s, e = _relative(start, high), _relative(end, high)
        n, i = len(holes), 0
        while i < n:
            hs, he = _relative(holes[i][0], high), _relative(holes[i][1], high)
            if s < he and hs < e:
                overlapped = True
                hole_end = holes[i][1]
                if s > hs and e < he:
                    holes[i][1] = start
                    holes.append([end, hole_end])
                elif s > hs:
                    holes[i][1] = start
                elif e < he:
                    holes[i][0] = end
                else:
                    holes[i] = holes[-1]
                    holes.pop()
                    if len(holes) < n:
                        n -= 1
                        continue
            i += 1
        self._trim(high)
        return overlapped
