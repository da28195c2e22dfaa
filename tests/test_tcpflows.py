"""The TCP flow tracker: exact handshake, retransmission and keep-alive semantics, compiled and Python alike."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter import tcpflows
from exporter.tcpflows import (ACK, EVENT_HANDSHAKE, EVENT_RETRANSMISSION, EVENT_RTT, EVENT_SEGMENT, IN, NO_TIME,
                               OUT, RST, SYN, FlowTable, TcpFrames)

BOTH = [pytest.param(True, id="native"), pytest.param(False, id="python")]


def frames(rows):
    """TcpFrames from (flow number, direction, flags, seq, ack, payload, time ns) rows."""
    rows = list(rows)
    keys = np.array([[0, 0x0A000002 + flow, 0, 0x0A000001, 4 << 32 | (40000 + flow) << 16 | 80]
                     for flow, *_ in rows], np.uint64).reshape(-1, 5)
    columns = list(zip(*[row[1:] for row in rows])) if rows else [()] * 6
    dtypes = (np.uint8, np.uint8, np.uint32, np.uint32, np.uint32, np.int64)
    return TcpFrames(keys, *(np.array(column, dtype) for column, dtype in zip(columns, dtypes)))


def table(native, capacity=100):
    if native and tcpflows.native_library() is None:
        pytest.skip("exporter/native/walk.so is not built")
    return FlowTable(capacity, native=native)


def track(native, rows, capacity=100):
    flows = table(native, capacity)
    events, rtt = flows.track(frames(rows))
    return events.tolist(), rtt.tolist(), flows


S, A = SYN, ACK
NS = 1_000_000  # one millisecond


@pytest.mark.parametrize("native", BOTH)
def test_handshake_rtt_counts_from_the_last_syn_ack(native):
    rows = [(0, IN, S, 1000, 0, 0, 0), (0, IN, S, 1000, 0, 0, 1000 * NS),  # SYN and its retransmission
            (0, OUT, S | A, 5000, 1001, 0, 1001 * NS), (0, OUT, S | A, 5000, 1001, 0, 1003 * NS),
            (0, IN, A, 1001, 5001, 0, 1015 * NS)]
    events, rtt, flows = track(native, rows)
    assert events == [0, 0, 0, 0, EVENT_HANDSHAKE | EVENT_RTT]
    assert rtt[-1] == 12 * NS
    assert flows.flows == 1


@pytest.mark.parametrize("native", BOTH)
def test_an_ack_of_the_wrong_number_or_without_syn_ack_completes_nothing(native):
    rows = [(0, IN, S, 1000, 0, 0, 0), (0, IN, A, 1001, 5001, 0, NS),  # no SYN-ACK yet
            (0, OUT, S | A, 5000, 999, 0, 2 * NS),  # acknowledges another SYN
            (1, IN, S, 7, 0, 0, 0), (1, OUT, S | A, 70, 8, 0, NS), (1, IN, A, 8, 99, 0, 2 * NS)]
    events, _, _ = track(native, rows)
    assert events == [0] * 6


@pytest.mark.parametrize("native", BOTH)
def test_retransmissions_reordering_keepalives_and_wraparound(native):
    base = 2**32 - 150  # the sequence numbers wrap inside the connection
    rows = [(0, OUT, A, base, 1, 100, 0),          # new (first seen: tracked from here)
            (0, OUT, A, base + 100, 1, 100, 0),    # new, wraps past 2**32
            (0, OUT, A, base, 1, 100, 0),          # retransmission
            (0, OUT, A, (base + 300) % 2**32, 1, 100, 0),  # new, leaves a hole of 100
            (0, OUT, A, (base + 200) % 2**32, 1, 100, 0),  # fills the hole: new
            (0, OUT, A, (base + 200) % 2**32, 1, 100, 0),  # now a retransmission
            (0, OUT, A, (base + 399) % 2**32, 1, 1, 0),    # keep-alive: neither
            (0, OUT, A, (base + 350) % 2**32, 1, 100, 0),  # half old, half new: new
            (0, IN, A, 1, 0, 10, 0),                       # the other direction is its own
            (0, IN, A, 1, 0, 10, 0)]
    events, _, _ = track(native, rows)
    seg, re = EVENT_SEGMENT, EVENT_SEGMENT | EVENT_RETRANSMISSION
    assert events == [seg, seg, re, seg, seg, re, 0, seg, seg, re]


@pytest.mark.parametrize("native", BOTH)
def test_lru_eviction_counts_unmeasured_handshakes(native):
    rows = [(0, IN, S, 1, 0, 0, 0), (1, IN, A, 1, 1, 10, 0), (0, IN, A, 11, 0, 5, 0),  # flow 0 seen last
            (2, IN, S, 1, 0, 0, 0),   # evicts flow 1 (least recently seen, handshake not begun)
            (3, IN, S, 1, 0, 0, 0),   # evicts flow 0 (its handshake never completed)
            (1, IN, A, 1, 1, 10, 0)]  # flow 1 again: new to the table, so new data
    events, _, flows = track(native, rows, capacity=2)
    assert events[-1] == EVENT_SEGMENT
    assert (flows.flows, flows.evictions, flows.unmeasured) == (2, 3, 2)


@st.composite
def traffic(draw):
    flows = draw(st.integers(1, 12))
    rows, clock = [], 0
    for _ in range(draw(st.integers(0, 300))):
        clock += draw(st.integers(0, 10**7))
        flow = draw(st.integers(0, flows - 1))
        base = flow * 7919 + 2**32 - 5000
        rows.append((flow, draw(st.sampled_from([IN, OUT])),
                     draw(st.sampled_from([A, A, A, S, S | A, A | 0x08, A | 0x01])),
                     (base + draw(st.integers(0, 9000))) % 2**32,
                     (base + draw(st.integers(-2, 3))) % 2**32,
                     draw(st.sampled_from([0, 0, 1, 100, 500, 1000])),
                     draw(st.sampled_from([clock, clock, NO_TIME]))))
    return rows


@settings(max_examples=250, deadline=None)
@given(rows=traffic(), capacity=st.integers(1, 16), split=st.integers(0, 300))
def test_native_and_python_trackers_agree(rows, capacity, split):
    if tcpflows.native_library() is None:
        pytest.skip("exporter/native/walk.so is not built")
    results = []
    for native in (True, False):
        flows = FlowTable(capacity, native=native)
        first, second = flows.track(frames(rows[:split])), flows.track(frames(rows[split:]))
        events = np.concatenate([first[0], second[0]])
        rtt = np.concatenate([first[1], second[1]])
        measured = (events & EVENT_RTT) != 0
        results.append((events.tolist(), rtt[measured].tolist(), flows.flows, flows.evictions, flows.unmeasured))
    assert results[0] == results[1]
