"""TCP connection state for TCP health: handshakes and their round trip, retransmitted and new payload segments.

Connection state is sequential per flow, so no array code can keep it: ``native/walk.c``
(``tcp_track``) walks the candidate TCP frames of a batch in capture order over a fixed-capacity hash
table with an exact LRU list, all in arrays this object preallocates; without the compiled library
the same algorithm runs in Python (an ``OrderedDict`` as table and LRU), with identical results --
the tests prove it.

A flow is (client address, server address, client port, server port), whatever the direction.
Per frame the result is a set of ``EVENT_*`` bits and, with ``EVENT_RTT``, the time from the
server's last SYN-ACK to the client's ACK completing the handshake. Payload segments are new unless
their whole sequence range was already seen in their direction: per direction the highest sequence
number seen plus up to ``HOLES`` ranges not yet seen below it (so a reordered segment that fills a
hole is new data; with more holes the one furthest behind is forgotten). A keep-alive (at most one
byte at the highest sequence number minus one) is no segment at all. SYN segments are never payload
segments; the connection's state starts at a client's SYN or at the first payload segment seen.
"""
from __future__ import annotations

import collections
import ctypes
from typing import NamedTuple

import numpy as np

from .walk import native_library

HOLES = 4
# traffic_client_tcp_handshake_rtt_seconds buckets (upper bounds, seconds; +Inf follows)
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RTT_BOUNDS_NS = np.array([round(bound * 1e9) for bound in RTT_BUCKETS], np.int64)
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
EVENT_SEGMENT, EVENT_RETRANSMISSION, EVENT_HANDSHAKE, EVENT_RTT = 1, 2, 4, 8
NO_TIME = np.iinfo(np.int64).min  # a frame recorded without a timestamp
IN, OUT = 0, 1
_STAGE_NONE, _STAGE_SYN, _STAGE_SYN_ACK = 0, 1, 2
_HOLE_ROOM = HOLES + 1
_MASK32 = 0xFFFFFFFF


class _Table(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("capacity", "slots", "count", "head", "tail", "evictions",
                                                      "unmeasured")] + [
        (name, ctypes.c_void_p) for name in ("slot_flow", "keys", "prev", "next", "stage", "client_isn",
                                             "server_isn", "synack_time", "started", "high", "hole_count", "holes")]


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


class TcpFrames(NamedTuple):
    """Candidate TCP frames of a batch, in capture order."""

    keys: np.ndarray  # (frames, 5) uint64: client hi, client lo, server hi, server lo, family << 32 | ports
    direction: np.ndarray  # uint8: IN (client to server) or OUT
    flags: np.ndarray  # uint8: the TCP flags byte
    seq: np.ndarray  # uint32
    ack: np.ndarray  # uint32
    payload: np.ndarray  # uint32: bytes of TCP payload
    times: np.ndarray  # int64 ns, NO_TIME when unknown


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
            self._library.tcp_track.argtypes = [ctypes.POINTER(_Table), ctypes.c_long] + [ctypes.c_void_p] * 9
            slots = 1 << max(4, (2 * capacity - 1).bit_length())  # at most half full: short probes
            self._arrays = {
                "slot_flow": np.full(slots, -1, np.int32), "keys": np.zeros(5 * capacity, np.uint64),
                "prev": np.zeros(capacity, np.int32), "next": np.zeros(capacity, np.int32),
                "stage": np.zeros(capacity, np.uint8), "client_isn": np.zeros(capacity, np.uint32),
                "server_isn": np.zeros(capacity, np.uint32), "synack_time": np.zeros(capacity, np.int64),
                "started": np.zeros(2 * capacity, np.uint8), "high": np.zeros(2 * capacity, np.uint32),
                "hole_count": np.zeros(2 * capacity, np.uint8),
                "holes": np.zeros(2 * capacity * _HOLE_ROOM * 2, np.uint32)}
            self._table = _Table(capacity, slots, 0, -1, -1, 0, 0,
                                 *(self._arrays[name].ctypes.data for name, _ in _Table._fields_[7:]))

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

    def track(self, frames: TcpFrames) -> tuple[np.ndarray, np.ndarray]:
        """Per frame, its EVENT_* bits (uint8) and the handshake round trip in ns (int64, where EVENT_RTT)."""
        count = len(frames.direction)
        events = np.zeros(count, np.uint8)
        rtt = np.zeros(count, np.int64)
        if count == 0:
            return events, rtt
        if self.native:
            inputs = [np.ascontiguousarray(values, dtype) for values, dtype in zip(
                frames, (np.uint64, np.uint8, np.uint8, np.uint32, np.uint32, np.uint32, np.int64))]
            self._library.tcp_track(ctypes.byref(self._table), count, *(values.ctypes.data for values in inputs),
                                    events.ctypes.data, rtt.ctypes.data)
        else:
            self._track_in_python(frames, events, rtt)
        return events, rtt

    def _track_in_python(self, frames: TcpFrames, events: np.ndarray, rtt: np.ndarray) -> None:
        table = self._python_flows
        for i, (key, direction, flags, seq, ack, payload, time) in enumerate(zip(
                map(tuple, frames.keys.tolist()), frames.direction.tolist(), frames.flags.tolist(),
                frames.seq.tolist(), frames.ack.tolist(), frames.payload.tolist(), frames.times.tolist())):
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
                continue
            found = flow is not None
            if not found:
                if payload == 0:
                    continue
                flow = self._insert(key)
            else:
                table.move_to_end(key)
            if (found and flow.stage == _STAGE_SYN_ACK and direction == IN and flags & ACK
                    and ack == (flow.server_isn + 1) & _MASK32):
                flow.stage = _STAGE_NONE
                events[i] = EVENT_HANDSHAKE
                if time != NO_TIME and flow.synack_time != NO_TIME:
                    rtt[i] = max(0, time - flow.synack_time)
                    events[i] |= EVENT_RTT
            if payload > 0:
                state = flow.directions[direction]
                if state is None:
                    flow.directions[direction] = _Direction((seq + payload) & _MASK32)
                    events[i] |= EVENT_SEGMENT
                else:
                    events[i] |= state.segment(seq, payload)

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
