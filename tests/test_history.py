"""History: exact per-second totals, zero-filled and bounded; per-client detail bounded in memory."""
from __future__ import annotations

import ipaddress
import threading
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from compat_api.history import FINE_SECONDS, MAX_BUCKET_CLIENTS, MAX_COARSE_SPANS, History, fold_small_clients
from exporter.classify import ServerSet
from exporter.decode import ETHERNET_HEADER_LENGTH
from exporter.persistence import restore, save_state

from exporter.tally import OTHER_CLIENT, Tally
from tests.builders import Frame, MACS, batch_counts, count_frames, frame_of

SERVER = "192.0.2.1"
SERVERS = ServerSet([SERVER])
IP_SRC_OFFSET = ETHERNET_HEADER_LENGTH + 12  # where an Ethernet frame's IPv4 source address begins


def http_request(client: str, payload: bytes = b"") -> Frame:
    return frame_of(Ether(**MACS) / IP(src=client, dst=SERVER) / TCP(sport=40000, dport=80) / payload)


def dns_answer(client: str, payload: bytes = b"") -> Frame:
    return frame_of(Ether(**MACS) / IP(src=SERVER, dst=client) / UDP(sport=53, dport=5353) / payload)


def feed(tally: Tally, frames: list[Frame]) -> int:
    """Count ``frames`` into ``tally`` the way the capture thread does; return their bytes."""
    tally.record(count_frames(frames, SERVERS))
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


def stamps(history: History, seconds: int = 10**6) -> list[int]:
    return history.seconds_window(seconds).stamps.tolist()


def bytes_per_second(history: History, seconds: int = 10**6) -> list[int]:
    return history.seconds_window(seconds).counts[:, 0].sum(axis=(1, 2)).tolist()


def cell(history: History, direction: str, protocol: str) -> tuple[int, int]:
    """Index of (direction, protocol) in the history's arrays."""
    return ("in", "out").index(direction), history.labels.index(protocol)


def client_bytes(history: History, seconds: int = 10**6) -> dict[str, int]:
    view = history.clients_window(seconds)
    return {client: int(counts.sum()) for client, counts in zip(view.clients, view.counts)}


def test_tick_stores_the_closed_second_stamped_with_its_start(tally, history):
    sent = feed(tally, [http_request("198.51.100.7", b"x" * 10), dns_answer("198.51.100.8")])
    history.tick(1000.2)
    view = history.seconds_window(10)
    assert view.stamps.tolist() == [999]
    assert bytes_per_second(history) == [sent]
    assert view.counts[0, 1][cell(history, "in", "HTTP")] == 1
    assert view.counts[0, 1][cell(history, "out", "DNS")] == 1
    assert set(client_bytes(history)) == {"198.51.100.7", "198.51.100.8"}


def test_tick_takes_only_traffic_since_previous_tick(tally, history):
    first = feed(tally, [http_request("198.51.100.7")])
    history.tick(1000.0)
    second = feed(tally, [http_request("198.51.100.7", b"y" * 100)])
    history.tick(1001.0)
    assert bytes_per_second(history) == [first, second]


def test_idle_ticks_store_empty_seconds(history):
    for second in range(1000, 1005):
        history.tick(second + 0.01)
    assert stamps(history) == [999, 1000, 1001, 1002, 1003]
    assert bytes_per_second(history) == [0] * 5
    assert client_bytes(history) == {}


def test_missed_seconds_are_zero_filled():
    tally = Tally()
    history = History(tally, 60)
    history.tick(1000.0)
    sent = feed(tally, [http_request("198.51.100.7")])
    history.tick(1005.3)  # the ticker fell four seconds behind
    assert stamps(history) == list(range(999, 1005))
    assert bytes_per_second(history) == [0, 0, 0, 0, 0, sent]


def test_zero_fill_after_long_gap_is_bounded_by_ring_length():
    tally = Tally()
    history = History(tally, 10)
    feed(tally, [http_request("198.51.100.7")])
    history.tick(1000.0)
    history.tick(1_000_000.0)
    assert stamps(history) == list(range(999_990, 1_000_000))
    assert bytes_per_second(history) == [0] * 10
    assert client_bytes(history) == {}  # the old second's detail left with it


def test_ring_keeps_only_the_newest_seconds():
    tally = Tally()
    history = History(tally, 5)
    for second in range(1000, 1020):
        feed(tally, [http_request("198.51.100.7", b"x" * (second - 1000))])
        history.tick(second)
    assert stamps(history, 100) == list(range(1014, 1019))
    assert bytes_per_second(history) == [http_request("198.51.100.7").wire_length + n for n in range(15, 20)]


def test_window_returns_newest_seconds_oldest_first():
    history = History(Tally(), 30)
    for second in range(1000, 1010):
        history.tick(second)
    assert stamps(history, 3) == [1006, 1007, 1008]
    assert len(stamps(history, 30)) == 10


def test_two_ticks_in_one_second_add_into_one_second(tally, history):
    first = feed(tally, [http_request("198.51.100.7")])
    history.tick(1000.1)
    second = feed(tally, [dns_answer("198.51.100.7")])
    history.tick(1000.9)
    assert stamps(history) == [999]
    assert bytes_per_second(history) == [first + second]
    assert client_bytes(history) == {"198.51.100.7": first + second}


def test_clock_stepped_back_keeps_order_and_counts(tally, history):
    history.tick(1000.0)
    history.tick(1001.0)
    sent = feed(tally, [http_request("198.51.100.7")])
    history.tick(990.0)
    assert stamps(history) == [999, 1000]
    assert bytes_per_second(history) == [0, sent]


def test_many_clients_fold_into_other_with_exact_totals():
    tally = Tally(max_clients=10_000)
    history = History(tally, 10)
    frames = many_clients(5000)
    sent = feed(tally, frames)
    history.tick(1000.0)
    per_client = client_bytes(history)
    assert len(per_client) == MAX_BUCKET_CLIENTS + 1
    assert OTHER_CLIENT in per_client
    assert bytes_per_second(history) == [sent]
    assert sum(per_client.values()) == sent
    sizes = {str(ipaddress.IPv4Address(f.data[IP_SRC_OFFSET:IP_SRC_OFFSET + 4])): f.wire_length for f in frames}
    kept = set(per_client) - {OTHER_CLIENT}
    assert min(sizes[c] for c in kept) >= max(size for c, size in sizes.items() if c not in kept)


def test_fold_merges_the_tally_other_client_instead_of_duplicating_it():
    clients = ["other", "198.51.100.7", "198.51.100.8"]
    counts = np.array([[[100, 0]], [[5, 0]], [[0, 7]]], np.int64)
    kept, folded = fold_small_clients(clients, counts, keep=1)
    assert kept == ("198.51.100.8", "other")
    assert folded.tolist() == [[[0, 7]], [[105, 0]]]


raw_buckets = st.dictionaries(
    st.tuples(st.integers(1, 6), st.sampled_from(["in", "out"]), st.sampled_from(["HTTP", "DNS", "OTHER"])),
    st.tuples(st.integers(0, 10**12), st.integers(1, 10**6)).map(list), max_size=30)


@settings(max_examples=50, deadline=None)
@given(raw=raw_buckets, max_clients=st.integers(0, 5))
def test_totals_and_client_sums_stay_exact_for_any_second(raw, max_clients):
    tally = Tally(max_clients=max_clients)
    history = History(tally, 10)
    tally.record(batch_counts({(bytes([198, 51, 100, host]), direction, protocol): value
                               for (host, direction, protocol), value in raw.items()}))
    history.tick(1000)
    view = history.seconds_window(10)
    assert int(view.counts[:, 0].sum()) == sum(b for b, _ in raw.values())
    assert int(view.counts[:, 1].sum()) == sum(p for _, p in raw.values())
    assert sum(client_bytes(history).values()) == sum(b for b, _ in raw.values())


@settings(max_examples=50)
@given(steps=st.lists(st.floats(0.0, 30.0, allow_nan=False), min_size=1, max_size=40),
       seconds=st.integers(1, 20))
def test_any_tick_sequence_gives_contiguous_bounded_series(steps, seconds):
    history = History(Tally(), seconds)
    now = 1000.0
    for step in steps:
        now += step
        history.tick(now)
    found = stamps(history, seconds)
    assert 1 <= len(found) <= seconds
    assert found == list(range(found[0], found[0] + len(found)))
    assert found[-1] == int(now) - 1


def test_long_history_keeps_client_detail_bounded_and_exact():
    """--history-seconds 3600: per-second detail for the newest 300 s, then spans; the sums stay exact."""
    tally = Tally(max_clients=1000)
    history = History(tally, 3600)
    frames = many_clients(250)
    sent_per_second = feed(tally, frames)
    for second in range(1000, 1000 + 3700):
        if second > 1000:
            feed(tally, frames[: (second % 250) + 1])
        history.tick(second)
    details = [*history._coarse, *history._open_span, *history._fine]
    assert len(history._fine) <= FINE_SECONDS
    assert len(history._coarse) <= MAX_COARSE_SPANS + 1
    assert all(len(detail.clients) <= MAX_BUCKET_CLIENTS + 1 for detail in details)
    for seconds in (1, 60, 300, 301, 1000, 3600):
        clients = history.clients_window(seconds)
        assert seconds - history._span_seconds < clients.seconds <= seconds
        covered = history.seconds_window(clients.seconds)
        assert int(clients.counts.sum()) == int(covered.counts[:, 0].sum())
    assert sent_per_second > 0


def test_a_day_of_history_with_busy_seconds_fits_in_bounded_memory():
    tally = Tally(max_clients=1000)
    busy_second = batch_counts({(bytes([10, 0, index >> 8, index & 0xFF]), "in", "HTTP"): (100 + index, 1)
                                for index in range(300)})
    tracemalloc.start()
    try:
        history = History(tally, 86400)
        for second in range(1000, 1000 + 700):
            tally.record(busy_second)
            history.tick(second)
        used = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # totals: 86400 s x 24 counters x 8 bytes = 16.6 MB; detail: at most ~600 entries of 201 clients
    assert used < 40 * 2**20, f"{used / 2**20:.1f} MiB"
    assert len(history._fine) == FINE_SECONDS


def test_readers_see_consistent_snapshots_while_ticking():
    tally = Tally()
    history = History(tally, 50)
    frame_bytes = http_request("198.51.100.7").wire_length
    errors: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            found = stamps(history, 50)
            if found and found != list(range(found[0], found[0] + len(found))):
                errors.append(f"gap in {found}")
            # every tick counts exactly one frame: a second never shows a partial state
            if any(nbytes != frame_bytes for nbytes in bytes_per_second(history, 50)):
                errors.append("partial second")

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
    assert len(stamps(history)) == 50


def test_ticker_thread_stores_a_second_every_second(tally, history):
    sent = feed(tally, [http_request("198.51.100.7")])
    history.start()
    try:
        deadline = time.monotonic() + 5
        while len(stamps(history)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        history.stop()
    found = stamps(history)
    assert len(found) >= 2
    assert sum(bytes_per_second(history)) == sent
    assert found[-1] <= time.time() - 1


def test_export_and_restore_round_trip_keeps_seconds_and_fills_the_gap(tmp_path):
    tally = Tally()
    saved = History(tally, 30)
    tally.record(batch_counts({("198.51.100.7", "in", "HTTP"): (100, 1)}))
    saved.tick(1000.5)
    saved.tick(1001.5)
    path = str(tmp_path / "state.json")
    save_state(path, {"history": saved.export_state()})
    restored = History(Tally(), 30)
    assert restore(path, {"history": restored.prepare_restore})
    restored.tick(1004.5)
    assert stamps(restored) == [999, 1000, 1001, 1002, 1003]  # saved seconds, a zero-filled gap, the new second
    assert restored.seconds_window(30).counts[0, :, 0].tolist() == [[100, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert client_bytes(restored) == {"198.51.100.7": 100}


def test_restore_of_a_long_history_keeps_its_spans(tmp_path):
    tally = Tally()
    saved = History(tally, 3600)
    for second in range(1000, 1000 + 1000):
        tally.record(batch_counts({("198.51.100.7", "in", "HTTP"): (10, 1)}))
        saved.tick(second)
    path = str(tmp_path / "state.json")
    save_state(path, {"history": saved.export_state()})
    restored = History(Tally(), 3600)
    assert restore(path, {"history": restored.prepare_restore})
    for seconds in (10, 500, 3600):
        assert restored.clients_window(seconds).seconds == saved.clients_window(seconds).seconds
        assert client_bytes(restored, seconds) == client_bytes(saved, seconds)
    assert bytes_per_second(restored) == bytes_per_second(saved)


@pytest.mark.parametrize("change, reason", [
    (lambda state: state["seconds"][-1].__setitem__(0, int(time.time()) + 3600), "future"),
    (lambda state: state["seconds"][0][1].__setitem__(0, -5), "negative"),
    (lambda state: state["seconds"][0][1].__setitem__(0, 10**400), "too big"),
    (lambda state: state["seconds"][0][1].__setitem__(0, 1.5), "not an integer"),
    (lambda state: state["seconds"].reverse(), "out of order"),
    (lambda state: state.__setitem__("labels", ["HTTP"]), "other labels"),
])
def test_restore_refuses_bad_seconds(change, reason):
    tally = Tally()
    saved = History(tally, 30)
    now = time.time()
    for offset in (-3, -2):
        tally.record(batch_counts({("198.51.100.7", "in", "HTTP"): (10, 1)}))
        saved.tick(now + offset)
    state = saved.export_state()
    change(state)
    with pytest.raises((ValueError, TypeError, KeyError)):
        History(Tally(), 30).prepare_restore(state)


def test_tcp_health_folds_and_merges_with_its_clients_and_sums_stay_exact():
    from compat_api.history import Detail, merge_details
    from exporter.tally import WINDOW_HEALTH_WIDTH

    rng = np.random.default_rng(5)
    details = []
    for second in range(10):
        clients = [f"198.51.100.{i}" for i in rng.choice(250, size=MAX_BUCKET_CLIENTS + 20, replace=False)]
        counts = rng.integers(1, 1000, size=(len(clients), 2, 3))
        health = rng.integers(0, 50, size=(len(clients), WINDOW_HEALTH_WIDTH))
        details.append((clients, counts, health))
    merged = merge_details(0, 10, [Detail(second, 1, tuple(c), n, h) for second, (c, n, h) in enumerate(details)])
    assert len(merged.clients) == MAX_BUCKET_CLIENTS + 1 and merged.clients[-1] == "other"
    assert (merged.health.sum(axis=0) == sum(h.sum(axis=0) for _, _, h in details)).all()
    per_client = {}
    for clients, _, health in details:
        for name, row in zip(clients, health):
            per_client[name] = per_client.get(name, 0) + row
    for name, row in zip(merged.clients[:-1], merged.health[:-1]):
        assert (row == per_client[name]).all()  # a kept client keeps exactly its own health
    assert merge_details(0, 1, [Detail(0, 1, ("x",), np.ones((1, 2, 3), np.int64))]).health is None
