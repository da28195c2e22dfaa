"""History: one compressed bucket per second, zero-filled, bounded, read consistently."""
from __future__ import annotations

import ipaddress
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from compat_api.history import MAX_BUCKET_CLIENTS, Bucket, History, compress
from exporter.capture import count_frames
from exporter.persistence import restore, save_state
from exporter.classify import DEFAULT_PORT_LABELS, ServerSet
from exporter.sources import Frame, FrameBatch
from exporter.tally import OTHER_CLIENT, Tally

SERVER = "192.0.2.1"
SERVERS = ServerSet([SERVER])
LINKTYPE_ETHERNET = 1
IP_SRC_OFFSET = 14 + 12  # Ethernet header, then the IPv4 source address


def frame(packet) -> Frame:
    """A captured Ethernet frame from a Scapy packet."""
    data = bytes(packet)
    return Frame(len(data), data)


def http_request(client: str, payload: bytes = b"") -> Frame:
    return frame(Ether() / IP(src=client, dst=SERVER) / TCP(sport=40000, dport=80) / payload)


def dns_answer(client: str, payload: bytes = b"") -> Frame:
    return frame(Ether() / IP(src=SERVER, dst=client) / UDP(sport=53, dport=5353) / payload)


def feed(tally: Tally, frames: list[Frame]) -> int:
    """Count ``frames`` into ``tally`` the way the capture thread does; return their bytes."""
    tally.record(*count_frames(FrameBatch.of(LINKTYPE_ETHERNET, frames), SERVERS, DEFAULT_PORT_LABELS))
    return sum(f.wire_length for f in frames)


def many_clients(count: int) -> list[Frame]:
    """One HTTP request from each of ``count`` clients: a Scapy template with the source patched."""
    template = http_request("10.0.0.0").data
    frames = []
    for index in range(count):
        packed = ipaddress.IPv4Address("10.0.0.0") + index + 1
        data = template[:IP_SRC_OFFSET] + packed.packed + template[IP_SRC_OFFSET + 4:]
        frames.append(Frame(len(data) + index % 7, data))
    return frames


def bucket_bytes(bucket: Bucket) -> int:
    return sum(nbytes for nbytes, _packets in bucket.totals.values())


def test_tick_appends_bucket_stamped_with_start_of_closed_second():
    tally = Tally()
    history = History(tally, 10)
    sent = feed(tally, [http_request("198.51.100.7", b"x" * 10), dns_answer("198.51.100.8")])
    history.tick(1000.2)
    [bucket] = history.window(10)
    assert bucket.timestamp == 999
    assert bucket_bytes(bucket) == sent
    assert bucket.totals[("in", "HTTP")][1] == 1
    assert bucket.totals[("out", "DNS")][1] == 1
    assert set(bucket.clients) == {"198.51.100.7", "198.51.100.8"}


def test_tick_takes_only_traffic_since_previous_tick():
    tally = Tally()
    history = History(tally, 10)
    first = feed(tally, [http_request("198.51.100.7")])
    history.tick(1000.0)
    second = feed(tally, [http_request("198.51.100.7", b"y" * 100)])
    history.tick(1001.0)
    assert [bucket_bytes(b) for b in history.window(10)] == [first, second]


def test_idle_ticks_append_empty_buckets():
    history = History(Tally(), 10)
    for second in range(1000, 1005):
        history.tick(second + 0.01)
    buckets = history.window(10)
    assert [b.timestamp for b in buckets] == [999, 1000, 1001, 1002, 1003]
    assert all(not b.totals and not b.clients for b in buckets)


def test_missed_seconds_are_zero_filled():
    tally = Tally()
    history = History(tally, 60)
    history.tick(1000.0)
    sent = feed(tally, [http_request("198.51.100.7")])
    history.tick(1005.3)  # the ticker fell four seconds behind
    buckets = history.window(60)
    assert [b.timestamp for b in buckets] == list(range(999, 1005))
    assert [bucket_bytes(b) for b in buckets] == [0, 0, 0, 0, 0, sent]


def test_zero_fill_after_long_gap_is_bounded_by_ring_length():
    history = History(Tally(), 10)
    history.tick(1000.0)
    history.tick(1_000_000.0)
    buckets = history.window(10)
    assert len(buckets) == 10
    assert [b.timestamp for b in buckets] == list(range(999_990, 1_000_000))


def test_ring_keeps_only_the_newest_seconds():
    history = History(Tally(), 5)
    for second in range(1000, 1020):
        history.tick(second)
    assert len(history) == 5
    assert [b.timestamp for b in history.window(100)] == list(range(1014, 1019))


def test_window_returns_newest_seconds_oldest_first():
    history = History(Tally(), 30)
    for second in range(1000, 1010):
        history.tick(second)
    assert [b.timestamp for b in history.window(3)] == [1006, 1007, 1008]
    assert len(history.window(30)) == 10


def test_two_ticks_in_one_second_add_into_one_bucket():
    tally = Tally()
    history = History(tally, 10)
    first = feed(tally, [http_request("198.51.100.7")])
    history.tick(1000.1)
    second = feed(tally, [dns_answer("198.51.100.7")])
    history.tick(1000.9)
    [bucket] = history.window(10)
    assert bucket.timestamp == 999
    assert bucket_bytes(bucket) == first + second


def test_clock_stepped_back_keeps_order_and_counts():
    tally = Tally()
    history = History(tally, 10)
    history.tick(1000.0)
    history.tick(1001.0)
    sent = feed(tally, [http_request("198.51.100.7")])
    history.tick(990.0)
    buckets = history.window(10)
    assert [b.timestamp for b in buckets] == [999, 1000]
    assert bucket_bytes(buckets[-1]) == sent


def test_many_clients_fold_into_other_with_exact_totals():
    tally = Tally(max_clients=10_000)
    history = History(tally, 10)
    frames = many_clients(5000)
    sent = feed(tally, frames)
    history.tick(1000.0)
    [bucket] = history.window(10)
    assert len(bucket.clients) == MAX_BUCKET_CLIENTS + 1
    assert OTHER_CLIENT in bucket.clients
    assert bucket_bytes(bucket) == sent
    client_bytes = sum(sum(detail.values()) for detail in bucket.clients.values())
    assert client_bytes == sent
    sizes = {str(ipaddress.IPv4Address(f.data[IP_SRC_OFFSET:IP_SRC_OFFSET + 4])): f.wire_length for f in frames}
    kept = set(bucket.clients) - {OTHER_CLIENT}
    assert min(sizes[c] for c in kept) >= max(size for c, size in sizes.items() if c not in kept)


def test_memory_stays_bounded_whatever_the_number_of_clients():
    tally = Tally(max_clients=100_000)
    history = History(tally, 5)
    frames = many_clients(3000)
    for second in range(1000, 1010):
        feed(tally, frames)
        history.tick(second)
    buckets = history.window(5)
    assert len(buckets) == 5
    assert all(len(b.clients) <= MAX_BUCKET_CLIENTS + 1 for b in buckets)
    assert all(len(detail) <= 2 * len(DEFAULT_PORT_LABELS) for b in buckets for detail in b.clients.values())


def test_tally_other_client_is_merged_not_duplicated():
    raw = {("other", "in", "HTTP"): [100, 1], ("198.51.100.7", "in", "HTTP"): [5, 1],
           ("198.51.100.8", "out", "DNS"): [7, 1]}
    totals, clients = compress(raw, max_clients=1)
    assert clients == {"198.51.100.8": {("out", "DNS"): 7}, "other": {("in", "HTTP"): 105}}
    assert totals == {("in", "HTTP"): (105, 2), ("out", "DNS"): (7, 1)}


raw_buckets = st.dictionaries(
    st.tuples(st.sampled_from(["a", "b", "c", "d", "other"]), st.sampled_from(["in", "out"]),
              st.sampled_from(["HTTP", "DNS", "OTHER"])),
    st.tuples(st.integers(0, 10**12), st.integers(0, 10**6)).map(list), max_size=30)


@given(raw=raw_buckets, max_clients=st.integers(0, 5))
def test_compress_keeps_totals_exact_for_any_bucket(raw, max_clients):
    totals, clients = compress(raw, max_clients)
    assert sum(b for b, _ in totals.values()) == sum(b for b, _ in raw.values())
    assert sum(p for _, p in totals.values()) == sum(p for _, p in raw.values())
    assert sum(sum(d.values()) for d in clients.values()) == sum(b for b, _ in raw.values())
    assert len([c for c in clients if c != OTHER_CLIENT]) <= max_clients


@settings(max_examples=50)
@given(steps=st.lists(st.floats(0.0, 30.0, allow_nan=False), min_size=1, max_size=40),
       seconds=st.integers(1, 20))
def test_any_tick_sequence_gives_contiguous_bounded_series(steps, seconds):
    history = History(Tally(), seconds)
    now = 1000.0
    for step in steps:
        now += step
        history.tick(now)
    stamps = [b.timestamp for b in history.window(seconds)]
    assert 1 <= len(stamps) <= seconds
    assert stamps == list(range(stamps[0], stamps[0] + len(stamps)))
    assert stamps[-1] == int(now) - 1


def test_readers_see_consistent_snapshots_while_ticking():
    tally = Tally()
    history = History(tally, 50)
    frame_bytes = http_request("198.51.100.7").wire_length
    errors: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            buckets = history.window(50)
            stamps = [b.timestamp for b in buckets]
            if stamps and stamps != list(range(stamps[0], stamps[0] + len(stamps))):
                errors.append(f"gap in {stamps}")
            # every tick counts exactly one frame: a bucket never shows a partial second
            if any(bucket_bytes(b) != frame_bytes for b in buckets):
                errors.append("partial bucket")

    readers = [threading.Thread(target=read) for _ in range(4)]
    for reader in readers:
        reader.start()
    try:
        for second in range(1000, 1500):
            feed(tally, [http_request("198.51.100.7")])
            history.tick(second)
    finally:
        done.set()
        for reader in readers:
            reader.join(5)
    assert errors == []
    assert len(history) == 50


def test_ticker_thread_appends_a_bucket_every_second():
    tally = Tally()
    history = History(tally, 10)
    sent = feed(tally, [http_request("198.51.100.7")])
    history.start()
    try:
        deadline = time.monotonic() + 5
        while len(history) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        history.stop()
    buckets = history.window(10)
    assert len(buckets) >= 2
    assert sum(bucket_bytes(b) for b in buckets) == sent
    assert buckets[-1].timestamp <= time.time() - 1


def test_export_and_restore_round_trip_keeps_buckets_and_fills_the_gap(tmp_path):
    tally = Tally()
    saved = History(tally, 30)
    tally.record({(ipaddress.ip_address("198.51.100.7").packed, "in", "HTTP"): [100, 1]}, {})
    saved.tick(1000.5)
    saved.tick(1001.5)
    restored = History(Tally(), 30)
    restored.tick(1004.5)
    path = str(tmp_path / "state.json")
    save_state(path, {"history": saved.export_state()})
    assert restore(path, {"history": restored.prepare_restore})
    stamps = [bucket.timestamp for bucket in restored.window(30)]
    assert stamps == [999, 1000, 1001, 1002, 1003]  # saved seconds, a zero-filled gap, the new second
    assert restored.window(30)[0].totals == {("in", "HTTP"): (100, 1)}
