"""The TCP flow tracker: exact handshake, retransmission and keep-alive semantics, compiled and Python alike."""
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter import tcpflows
from exporter.decode import LINKTYPE_ETHERNET
from exporter.frames import FrameBatch
from exporter.headers import parse_frames
from exporter.tcpflows import (ACK, EVENT_HANDSHAKE, EVENT_RESET, EVENT_RETRANSMISSION, EVENT_RTT, EVENT_SEGMENT, IN,
                               OUT, RST, SYN, FlowTable, TcpFamily, tcp_columns)

BOTH = [pytest.param(True, id="native"), pytest.param(False, id="python")]


def batch_of_rows(rows, ipv6_flows=()):
    """Ethernet/IP/TCP frames from (flow, direction, flags, seq, ack, payload, time us or None) rows.

    Flow n is client 10.0.0.2 (fd00::2 for the flows in ``ipv6_flows``) port 40000 + n with the
    server 10.0.0.1 (fd00::1) port 80.
    """
    pieces, spans, times, position = [], [], [], 0
    for flow, direction, flags, seq, ack, payload, time in rows:
        v6 = flow in ipv6_flows
        client, server = ((b"\xfd" + bytes(14) + b"\x02", 40000 + flow), (b"\xfd" + bytes(14) + b"\x01", 80)) if v6 \
            else ((b"\x0a\0\0\x02", 40000 + flow), (b"\x0a\0\0\x01", 80))
        (src, sport), (dst, dport) = (client, server) if direction == IN else (server, client)
        tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 0x50, flags, 1024, 0, 0) + bytes(payload)
        if v6:
            ip = struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + src + dst
        else:
            ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0) + src + dst
        frame = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02" + (b"\x86\xdd" if v6 else b"\x08\x00") + ip + tcp
        pieces.append(frame)
        spans.append((position, position + len(frame), len(frame)))
        times.append(None if time is None else time / 1e6)
        position += len(frame)
    return FrameBatch.from_spans(LINKTYPE_ETHERNET, b"".join(pieces), spans, times)


def table(native, capacity=100):
    if native and tcpflows.native_library() is None:
        pytest.skip("exporter/native/walk.so is not built")
    return FlowTable(capacity, native=native)


def track_batch(flows, batch, timestamps=True):
    """Per frame of the batch (events, rtt ns), and the batch's sums (all frames one client row)."""
    result, (v4, v6) = parse_frames(batch.link_type, batch.buffer, batch.starts, batch.ends)
    columns = tcp_columns(1)
    sums = np.zeros((1, columns.width), np.int64)
    # the server: 10.0.0.1, or fd00::1 (whose low half is 1)
    parts = [TcpFamily(family, ip, ip.dst_lo == server, np.zeros(len(ip.index), np.int64),
                       np.zeros(len(ip.index), np.uint8)) for family, ip, server in ((4, v4, 0x0A000001), (6, v6, 1))]
    results = flows.track(batch.buffer, batch.starts, batch.wire_lengths, batch.timestamps if timestamps else None,
                          parts, sums, columns)
    events, rtt = np.zeros(len(batch), np.uint8), np.zeros(len(batch), np.int64)
    for part, (part_events, part_rtt) in zip(parts, results):
        events[part.frames.index], rtt[part.frames.index] = part_events, part_rtt
    return events, rtt, sums[0]


def track(native, rows, capacity=100):
    flows = table(native, capacity)
    events, rtt, _ = track_batch(flows, batch_of_rows(rows))
    return events.tolist(), rtt.tolist(), flows


S, A = SYN, ACK
MS = 1000  # one millisecond, in the rows' microseconds
NS = 1_000_000  # one millisecond in ns


@pytest.mark.parametrize("native", BOTH)
def test_handshake_rtt_counts_from_the_last_syn_ack(native):
    rows = [(0, IN, S, 1000, 0, 0, 0), (0, IN, S, 1000, 0, 0, 1000 * MS),  # SYN and its retransmission
            (0, OUT, S | A, 5000, 1001, 0, 1001 * MS), (0, OUT, S | A, 5000, 1001, 0, 1003 * MS),
            (0, IN, A, 1001, 5001, 0, 1015 * MS)]
    events, rtt, flows = track(native, rows)
    assert events == [0, 0, 0, 0, EVENT_HANDSHAKE | EVENT_RTT]
    assert rtt[-1] == 12 * NS
    assert flows.flows == 1


@pytest.mark.parametrize("native", BOTH)
def test_an_ack_of_the_wrong_number_or_without_syn_ack_completes_nothing(native):
    rows = [(0, IN, S, 1000, 0, 0, 0), (0, IN, A, 1001, 5001, 0, MS),  # no SYN-ACK yet
            (0, OUT, S | A, 5000, 999, 0, 2 * MS),  # acknowledges another SYN
            (1, IN, S, 7, 0, 0, 0), (1, OUT, S | A, 70, 8, 0, MS), (1, IN, A, 8, 99, 0, 2 * MS)]
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


@pytest.mark.parametrize("native", BOTH)
def test_resets_count_and_touch_no_flow_and_sums_follow_the_events(native):
    rows = [(0, IN, S, 1, 0, 0, 0), (0, OUT, S | A, 9, 2, 0, 100), (0, IN, A, 2, 10, 0, 600),
            (0, OUT, A, 10, 2, 50, 700), (0, OUT, A, 10, 2, 50, 800), (0, IN, RST | A, 2, 60, 0, 900),
            (1, OUT, RST, 5, 0, 0, 1000)]
    flows = table(native)
    events, rtt, sums = track_batch(flows, batch_of_rows(rows))
    columns = tcp_columns(1)
    assert events.tolist() == [0, 0, EVENT_HANDSHAKE | EVENT_RTT, EVENT_SEGMENT,
                               EVENT_SEGMENT | EVENT_RETRANSMISSION, EVENT_RESET, EVENT_RESET]
    assert flows.flows == 1
    assert sums[columns.resets:columns.resets + 2].tolist() == [1, 1]
    assert sums[columns.segments:columns.segments + 2].tolist() == [0, 2]
    assert sums[columns.retransmitted:columns.retransmitted + 2].tolist() == [0, 1]
    assert sums[columns.handshakes] == 1 and sums[columns.rtt_sum_ns] == 500_000
    assert sums[columns.rtt_buckets:columns.rtt_sum_ns].tolist() == [1] + [0] * 13  # 0.5 ms: le 0.0005


@st.composite
def traffic(draw):
    flows = draw(st.integers(1, 12))
    rows, clock = [], 0
    for _ in range(draw(st.integers(0, 300))):
        clock += draw(st.integers(0, 10**7))
        flow = draw(st.integers(0, flows - 1))
        base = flow * 7919 + 2**32 - 5000
        rows.append((flow, draw(st.sampled_from([IN, OUT])),
                     draw(st.sampled_from([A, A, A, S, S | A, A | 0x08, A | 0x01, RST, RST | A])),
                     (base + draw(st.integers(0, 9000))) % 2**32,
                     (base + draw(st.integers(-2, 3))) % 2**32,
                     draw(st.sampled_from([0, 0, 1, 100, 500, 1000])),
                     draw(st.sampled_from([clock, clock, None]))))
    return rows


@settings(max_examples=250, deadline=None)
@given(rows=traffic(), capacity=st.integers(1, 16), split=st.integers(0, 300),
       ipv6_flows=st.sets(st.integers(0, 11)))
def test_native_and_python_trackers_agree(rows, capacity, split, ipv6_flows):
    """Any traffic, IPv4 and IPv6 interleaved (one batch is walked in capture order across both), any
    table size, batches cut anywhere: the same events, round trips, sums and table figures."""
    if tcpflows.native_library() is None:
        pytest.skip("exporter/native/walk.so is not built")
    results = []
    for native in (True, False):
        flows = FlowTable(capacity, native=native)
        parts = [track_batch(flows, batch_of_rows(part, ipv6_flows)) for part in (rows[:split], rows[split:]) if part]
        events = [e for part in parts for e in part[0].tolist()]
        rtt = [r for part in parts for r in part[1].tolist()]
        sums = sum((part[2] for part in parts), np.zeros(tcp_columns(1).width, np.int64)).tolist()
        results.append((events, rtt, sums, flows.flows, flows.evictions, flows.unmeasured))
    assert results[0] == results[1]


def test_rtt_quantile_interpolates_within_buckets_as_histogram_quantile_does():
    from exporter.tcpflows import RTT_BUCKETS, rtt_quantile

    buckets = [0] * (len(RTT_BUCKETS) + 1)
    assert rtt_quantile(0.5, buckets) is None
    buckets[RTT_BUCKETS.index(0.025)] = 2  # two in (0.01, 0.025]
    buckets[RTT_BUCKETS.index(0.05)] = 2  # two in (0.025, 0.05]
    assert rtt_quantile(0.5, buckets) == pytest.approx(0.025)  # rank 2: the top of the second bucket
    assert rtt_quantile(0.25, buckets) == pytest.approx(0.0175)  # rank 1: half-way through (0.01, 0.025]
    buckets[-1] = 10  # beyond 5 s: the last bound, as Prometheus answers
    assert rtt_quantile(0.99, buckets) == 5.0


@pytest.mark.parametrize("native", BOTH)
def test_the_least_recently_seen_flow_is_evicted_in_capture_order_across_ip_families(native):
    rows = [(0, IN, A, 1, 1, 10, 0),    # flow 0 (IPv4)
            (1, IN, A, 1, 1, 10, 0),    # flow 1 (IPv6)
            (0, IN, A, 1, 1, 10, 0),    # flow 0 again: a retransmission, and now the most recent
            (2, IN, A, 1, 1, 10, 0),    # flow 2 (IPv4): the table is full, flow 1 is the least recent
            (1, IN, A, 1, 1, 10, 0)]    # flow 1 again: forgotten, so new data
    flows = table(native, capacity=2)
    events, _, _ = track_batch(flows, batch_of_rows(rows, ipv6_flows={1}))
    seg, re = EVENT_SEGMENT, EVENT_SEGMENT | EVENT_RETRANSMISSION
    assert events.tolist() == [seg, seg, re, seg, seg]
    assert flows.evictions == 2
