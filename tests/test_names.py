"""The background resolver's bounds, with an injected resolve function: rate, concurrency, queue, cache, TTLs."""
from __future__ import annotations

import threading
import time
import tracemalloc

from exporter.names import MAX_NAME_LENGTH, NameResolver, RateLimit
from tests.builders import ManualClock


class Counting:
    """A resolve function that records when each query was made and how many ran at once."""

    def __init__(self, delay: float = 0.0, answer=lambda address: f"host-{address}.example"):
        self.delay, self.answer = delay, answer
        self.times: list[float] = []
        self.in_flight = self.most_in_flight = 0
        self._lock = threading.Lock()

    def __call__(self, address: str):
        with self._lock:
            self.times.append(time.monotonic())
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(self.delay)
        with self._lock:
            self.in_flight -= 1
        return self.answer(address)


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def flood_addresses(count: int) -> list[str]:
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(count)]


def test_a_flood_of_100k_new_clients_is_resolved_at_the_configured_rate_in_bounded_memory():
    rate, seconds = 40, 3.0
    resolve = Counting()
    resolver = NameResolver(rate, workers=3, queue_size=512, cache_size=1000, resolve=resolve)
    flood = flood_addresses(100_000)
    tracemalloc.start()
    resolver.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        started = time.monotonic()
        for address in flood:
            resolver.submit(address)
        submitted = time.monotonic() - started
        time.sleep(seconds)
        grown = tracemalloc.get_traced_memory()[1] - before
    finally:
        resolver.stop()
        tracemalloc.stop()
    stats = resolver.stats()
    times = sorted(resolve.times)
    # Any window of a second (less 10 ms for threads waking late) holds at most `rate` queries.
    for index, first in enumerate(times):
        assert sum(1 for t in times[index:index + rate + 1] if t < first + 0.99) <= rate
    assert rate * seconds * 0.8 <= len(times) <= rate * (seconds + submitted) + 1
    assert stats.queries == len(times) and stats.failures == 0
    assert stats.dropped + len(resolver._pending) + stats.queries == 100_000  # every client dropped, waiting or asked
    assert stats.dropped >= 100_000 - 512 - len(times) - 3
    assert stats.queued <= 512 and stats.cached <= 1000
    assert grown < 2 * 1024 * 1024, f"{grown} bytes"  # the queue's 512 entries, not 100k


def test_queries_in_flight_never_exceed_the_workers():
    resolve = Counting(delay=0.05)
    resolver = NameResolver(1000, workers=2, resolve=resolve)
    resolver.start()
    try:
        for address in flood_addresses(30):
            resolver.submit(address)
        wait_until(resolver.idle)
    finally:
        resolver.stop()
    assert resolve.most_in_flight == 2 and len(resolve.times) == 30
    assert resolver.hostname("10.0.0.7") == "host-10.0.0.7.example"


def test_answers_are_cached_with_positive_and_negative_ttls():
    clock = ManualClock()
    answers = {"192.0.2.1": "one.example"}
    resolver = NameResolver(1000, resolve=answers.get, clock=clock, positive_ttl=100, negative_ttl=10)
    resolver._limit = RateLimit(1000)  # real time for the pacing, the fake clock for the TTLs
    resolver.start()
    try:
        for address in ("192.0.2.1", "192.0.2.2"):
            resolver.submit(address)
        wait_until(resolver.idle)
        assert resolver.stats().queries == 2 and resolver.stats().failures == 1
        for address in ("192.0.2.1", "192.0.2.2"):
            resolver.submit(address)  # fresh answers: no query
        assert resolver.idle() and resolver.stats().queries == 2
        clock.now += 11  # the failure expired, the name did not
        answers["192.0.2.2"] = "two.example"
        assert resolver.hostname("192.0.2.1") == "one.example" and resolver.hostname("192.0.2.2") is None
        wait_until(resolver.idle)
        assert resolver.stats().queries == 3 and resolver.hostname("192.0.2.2") == "two.example"
        clock.now += 100  # the first name expired: still shown while it is asked for again
        answers["192.0.2.1"] = "renamed.example"
        assert resolver.hostname("192.0.2.1") == "one.example"
        wait_until(resolver.idle)
        assert resolver.hostname("192.0.2.1") == "renamed.example" and resolver.stats().queries == 4
    finally:
        resolver.stop()


def test_the_cache_keeps_at_most_its_size_newest_answers_first():
    resolver = NameResolver(1000, cache_size=10, resolve=lambda address: "x.example")
    for address in flood_addresses(50):
        resolver._answer(address, "x.example")
    assert resolver.stats().cached == 10
    assert resolver.hostname("10.0.0.49") == "x.example" and resolver.hostname("10.0.0.0") is None


def test_names_are_cut_to_a_dns_names_length_and_only_addresses_are_asked_for():
    resolve = Counting(answer=lambda address: "a" * 1000)
    resolver = NameResolver(1000, resolve=resolve)
    resolver.start()
    try:
        for client in ("10.0.0.0/24", "AS64496", "DE", "other", "unknown", "2001:db8::1"):
            resolver.submit(client)
        wait_until(resolver.idle)
    finally:
        resolver.stop()
    assert len(resolve.times) == 1 and resolver.hostname("2001:db8::1") == "a" * MAX_NAME_LENGTH


def test_a_failing_resolve_function_counts_a_failure_and_the_worker_goes_on():
    calls = []

    def broken(address):
        calls.append(address)
        if len(calls) == 1:
            raise RuntimeError("resolver bug")
        return "fine.example"

    resolver = NameResolver(1000, workers=1, resolve=broken)
    resolver.start()
    try:
        resolver.submit("192.0.2.1")
        resolver.submit("192.0.2.2")
        wait_until(resolver.idle)
    finally:
        resolver.stop()
    assert resolver.stats().failures == 1 and resolver.hostname("192.0.2.2") == "fine.example"


def test_stop_returns_promptly_with_work_queued():
    resolver = NameResolver(1, resolve=lambda address: None)
    resolver.start()
    for address in flood_addresses(100):
        resolver.submit(address)
    started = time.monotonic()
    resolver.stop()
    assert time.monotonic() - started < 1.5
    assert not any(thread.is_alive() for thread in resolver._threads)
