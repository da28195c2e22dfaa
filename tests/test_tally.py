"""Tally: exact sums, bounded client table, idle eviction that moves nothing, exact totals, buckets."""
import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.clients import ClientGrouping
from exporter.tally import DEFAULT_CLIENT_IDLE_SECONDS, OTHER_CLIENT, Tally
from tests.builders import ManualClock, batch_counts
from tests.tcp_traffic import tcp_health_tally


def packed(address):
    return ipaddress.ip_address(address).packed


def batch(*entries, ignored=None, grouping=None):
    """entries: (address, direction, protocol, bytes, packets)"""
    return batch_counts({(a, d, p): (b, n) for a, d, p, b, n in entries}, ignored, grouping)


def test_counts_series_per_client_direction_protocol():
    tally = Tally()
    tally.record(batch(("198.51.100.7", "in", "HTTP", 100, 2), ("2001:db8::1", "out", "DNS", 60, 1), ignored={"not_ip": 3}))
    tally.record(batch(("198.51.100.7", "in", "HTTP", 50, 1), ignored={"malformed": 1}))
    snapshot = tally.snapshot()
    assert snapshot.series == {("198.51.100.7", "in", "HTTP"): (150, 3), ("2001:db8::1", "out", "DNS"): (60, 1)}
    assert snapshot.results == {"counted": 4, "not_ip": 3, "not_server": 0, "internal": 0, "malformed": 1}
    assert sum(snapshot.results.values()) == 8 and snapshot.tracked_clients == 2


def test_clients_beyond_the_cap_count_as_other():
    tally = Tally(max_clients=2)
    tally.record(batch(*[(f"198.51.100.{i}", "in", "SSH", 10 * i, 1) for i in range(1, 5)]))
    snapshot = tally.snapshot()
    assert snapshot.tracked_clients == 2
    assert snapshot.series[(OTHER_CLIENT, "in", "SSH")] == (30 + 40, 2)
    assert sum(b for b, _ in snapshot.series.values()) == 100


def test_evicted_clients_series_end_and_nothing_moves_to_other():
    clock = ManualClock()
    tally = Tally(max_clients=1, client_idle_seconds=60, clock=clock)
    tally.record(batch(("198.51.100.1", "in", "HTTP", 500, 5)))
    clock.now += 61
    tally.record(batch(("198.51.100.2", "out", "HTTP", 70, 1)))  # expiry runs first only once a second
    snapshot = tally.snapshot()
    assert ("198.51.100.1", "in", "HTTP") not in snapshot.series
    assert (OTHER_CLIENT, "in", "HTTP") not in snapshot.series  # Prometheus already saw those 500 bytes
    assert snapshot.total_series == {("in", "HTTP"): (500, 5), ("out", "HTTP"): (70, 1)}
    assert snapshot.evictions == 1
    # the freed slot admits the next new client
    tally.record(batch(("198.51.100.3", "in", "SSH", 9, 1)))
    assert tally.snapshot().series[("198.51.100.3", "in", "SSH")] == (9, 1)


def test_other_counts_only_clients_never_admitted():
    clock = ManualClock()
    tally = Tally(max_clients=1, client_idle_seconds=60, clock=clock)
    tally.record(batch(("198.51.100.1", "in", "HTTP", 500, 5), ("198.51.100.2", "in", "HTTP", 30, 1)))
    assert tally.snapshot().series[(OTHER_CLIENT, "in", "HTTP")] == (30, 1)
    clock.now += 61
    tally.expire()
    tally.record(batch(("198.51.100.2", "in", "HTTP", 7, 1)))  # admitted now: a series of its own
    snapshot = tally.snapshot()
    assert snapshot.series[("198.51.100.2", "in", "HTTP")] == (7, 1)
    assert snapshot.series[(OTHER_CLIENT, "in", "HTTP")] == (30, 1)


def test_expire_without_traffic_evicts():
    clock = ManualClock()
    tally = Tally(client_idle_seconds=5, clock=clock)
    tally.record(batch(("198.51.100.1", "in", "HTTP", 5, 1)))
    clock.now += 6
    tally.expire()
    assert tally.snapshot().tracked_clients == 0


def test_prefix_aggregation_labels_clients_by_network():
    grouping = ClientGrouping(24, 48)
    tally = Tally(grouping=grouping)
    tally.record(batch(("198.51.100.7", "in", "HTTP", 1, 1), ("198.51.100.200", "in", "HTTP", 2, 1),
                       ("2001:db8:1:2::1", "out", "DNS", 4, 1), grouping=grouping))
    assert tally.snapshot().series == {("198.51.100.0/24", "in", "HTTP"): (3, 2),
                                       ("2001:db8:1::/48", "out", "DNS"): (4, 1)}


def test_take_bucket_returns_traffic_since_previous_call():
    tally = Tally()
    tally.record(batch(("198.51.100.7", "in", "HTTP", 100, 2)))
    bucket = tally.take_bucket()
    assert bucket.clients == ["198.51.100.7"]
    assert int(bucket.counts[0, 0, tally.labels.index("HTTP")]) == 100
    assert bucket.totals[:, 0, tally.labels.index("HTTP")].tolist() == [100, 2]
    empty = tally.take_bucket()
    assert empty.clients == [] and not empty.totals.any()
    assert tally.snapshot().series[("198.51.100.7", "in", "HTTP")] == (100, 2)


def test_a_client_evicted_within_the_second_keeps_its_bytes_in_the_bucket():
    clock = ManualClock()
    tally = Tally(client_idle_seconds=5, clock=clock)
    tally.take_bucket()
    tally.record(batch(("198.51.100.7", "in", "HTTP", 100, 2)))
    clock.now += 6
    tally.expire()
    tally.record(batch(("198.51.100.7", "in", "HTTP", 10, 1)))  # back at once: a new series
    bucket = tally.take_bucket()
    assert bucket.clients == ["198.51.100.7"]
    assert int(bucket.counts.sum()) == 110 and bucket.totals[0].sum() == 110


def test_the_table_grows_to_the_cap_and_no_further():
    tally = Tally(max_clients=300)
    tally.record(batch(*[(f"10.0.{i // 250}.{i % 250}", "in", "DNS", 1, 1) for i in range(1000)]))
    snapshot = tally.snapshot()
    assert snapshot.tracked_clients == 300
    assert snapshot.series[("other", "in", "DNS")] == (700, 700)


streams = st.lists(st.lists(st.tuples(st.integers(0, 40), st.sampled_from(["in", "out"]),
                                      st.sampled_from(["HTTP", "DNS", "OTHER"]), st.integers(1, 1500),
                                      st.integers(0, 30)), max_size=20), max_size=30)


def prometheus_increase(previous: dict, current: dict) -> int:
    """What increase() adds up over all series between two scrapes: a new series counts from 0,
    a lower value is a counter reset, a vanished series adds nothing."""
    added = 0
    for key, (nbytes, _packets) in current.items():
        before = previous.get(key, (0, 0))[0]
        added += nbytes - before if nbytes >= before else nbytes
    return added


@settings(max_examples=200, deadline=None)
@given(stream=streams, max_clients=st.integers(0, 10), idle=st.integers(1, 50))
def test_invariants_hold_for_random_streams(stream, max_clients, idle):
    clock = ManualClock()
    tally = Tally(max_clients=max_clients, client_idle_seconds=idle, clock=clock)
    total = increase = 0
    previous = tally.snapshot()
    for frames in stream:
        counts = {}
        for host, direction, protocol, size, advance in frames:
            key = (packed(f"10.0.0.{host}"), direction, protocol)
            counts.setdefault(key, [0, 0])
            counts[key][0] += size
            counts[key][1] += 1
            total += size
            clock.now += advance / 10
        tally.record(batch_counts(counts))
        snapshot = tally.snapshot()
        assert int(snapshot.totals[0].sum()) == total
        client_sum = sum(b for b, _ in snapshot.series.values())
        assert client_sum <= total
        if snapshot.evictions == 0:
            assert client_sum == total
        assert snapshot.tracked_clients <= max_clients
        assert len({key[0] for key in snapshot.series} - {OTHER_CLIENT}) <= max_clients
        if snapshot.evictions == previous.evictions:  # a series that survives never goes down
            for key, (nbytes, packets) in snapshot.series.items():
                if key in previous.series:
                    assert nbytes >= previous.series[key][0] and packets >= previous.series[key][1]
        increase += prometheus_increase(previous.series, snapshot.series)
        previous = snapshot
    assert increase == total  # scraped after every batch, no byte is counted twice or lost


def test_an_evicted_clients_tcp_health_series_end_and_the_totals_keep_it(tmp_path):
    now = [0.0]
    tally, expected = tcp_health_tally(tmp_path, clock=lambda: now[0])
    before = tally.snapshot()
    now[0] = DEFAULT_CLIENT_IDLE_SECONDS + 10
    tally.expire()
    after = tally.snapshot()
    assert before.tcp.shape[0] == 5 and after.clients == ["other"]
    assert not after.tcp.any()  # other never counted these clients; nothing moved into it
    assert (after.tcp_totals == before.tcp_totals).all() and before.tcp_totals.sum() > 0
