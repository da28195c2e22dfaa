"""``--resolve-names``: host names (PTR) of tracked clients, resolved in the background, bounded every way.

The tally hands each newly tracked client to ``submit`` (a non-blocking put; when the queue is
full the client is dropped and counted). A few worker threads resolve through the system resolver
(``getnameinfo``, so ``/etc/hosts`` and nsswitch apply), all together at most ``rate`` queries per
second, so a flood of new clients cannot flood the DNS server. Answers are cached with a positive
and a negative TTL in a cache of bounded size; an expired answer is still shown until it is
re-resolved, which a later ``hostname`` call asks for. Nothing here runs on the capture's path
or during a scrape beyond a dictionary read and a non-blocking put.

A PTR name is data from whoever controls the reverse zone: it is shown as returned, cut to
``MAX_NAME_LENGTH``, and only ever used as a label value.
"""
from __future__ import annotations

import collections
import ipaddress
import logging
import queue
import socket
import threading
import time
from typing import Callable, NamedTuple, Optional

log = logging.getLogger(__name__)

MAX_NAME_LENGTH = 253  # the longest DNS name in text form
DEFAULT_RATE = 10
DEFAULT_WORKERS = 3  # queries in flight at most: a slow DNS server holds up three threads, not the exporter
QUEUE_SIZE = 4096
CACHE_SIZE = 65536
POSITIVE_TTL = 3600.0
NEGATIVE_TTL = 300.0


class ResolverStats(NamedTuple):
    queries: int
    failures: int
    dropped: int
    cached: int
    queued: int


def system_resolve(address: str) -> Optional[str]:
    """The PTR name of ``address`` through the system resolver (nsswitch: files, dns, ...), or None."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sockaddr = (address, 0, 0, 0) if family == socket.AF_INET6 else (address, 0)
    try:
        host, _port = socket.getnameinfo(sockaddr, socket.NI_NAMEREQD)
    except (socket.gaierror, socket.herror, OSError, UnicodeError):
        return None
    return host


class RateLimit:
    """At most ``rate`` grants per second across threads: consecutive grants at least 1/rate apart.

    One caller waits for the next grant at a time; the others wait on the lock without waking.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.interval = 1.0 / rate
        self.clock = clock
        self._next = float("-inf")
        self._turn = threading.Lock()

    def acquire(self, stop: threading.Event) -> bool:
        """Wait for a grant; False if ``stop`` is set first."""
        with self._turn:
            wait = self._next - self.clock()
            if (stop.wait(wait) if wait > 0 else stop.is_set()):
                return False
            self._next = self.clock() + self.interval
            return True


class NameResolver:
    """Background PTR resolution for client addresses, with a bounded queue, workers, rate and cache."""

    def __init__(self, rate: float = DEFAULT_RATE, *, workers: int = DEFAULT_WORKERS, queue_size: int = QUEUE_SIZE,
                 cache_size: int = CACHE_SIZE, positive_ttl: float = POSITIVE_TTL, negative_ttl: float = NEGATIVE_TTL,
                 resolve: Callable[[str], Optional[str]] = system_resolve, clock: Callable[[], float] = time.monotonic):
        self.rate, self.workers = rate, workers
        self.positive_ttl, self.negative_ttl = positive_ttl, negative_ttl
        self.resolve, self.clock = resolve, clock
        self._limit = RateLimit(rate, clock)
        self._queue: queue.Queue[str] = queue.Queue(queue_size)
        self._cache: collections.OrderedDict[str, tuple[Optional[str], float]] = collections.OrderedDict()
        self._cache_size = cache_size
        self._pending: set[str] = set()  # queued or being resolved: asked for once
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.queries = self.failures = self.dropped = 0

    def submit(self, client: str) -> None:
        """Ask for the name of ``client`` if it is an address without a fresh answer; never blocks."""
        with self._lock:
            if client in self._pending:
                return
            cached = self._cache.get(client)
            if cached is not None and cached[1] > self.clock():
                return
            try:
                address = ipaddress.ip_address(client)
            except ValueError:  # a network, an AS, a country: no PTR name
                return
            try:
                self._queue.put_nowait(str(address))
            except queue.Full:
                self.dropped += 1
                return
            self._pending.add(client)

    def hostname(self, client: str) -> Optional[str]:
        """The cached name of ``client`` (None if unknown); an expired answer is kept and asked for again."""
        cached = self._cache.get(client)
        if cached is None:
            return None
        if cached[1] <= self.clock():
            self.submit(client)
        return cached[0]

    def stats(self) -> ResolverStats:
        return ResolverStats(self.queries, self.failures, self.dropped, len(self._cache), self._queue.qsize())

    def start(self) -> None:
        for number in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"resolver-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the workers; one stuck in the system resolver is left behind (a daemon thread)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def idle(self) -> bool:
        """Nothing queued and nothing being resolved."""
        with self._lock:
            return not self._pending

    def wait_idle(self, seconds: float) -> bool:
        """Wait until every name asked for is answered, ``seconds`` at most; whether it is."""
        deadline = time.monotonic() + seconds
        while not self.idle():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                address = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if not self._limit.acquire(self._stop):
                return
            try:
                name = self.resolve(address)
            except Exception:  # a resolver bug must not end the worker
                log.exception("resolving %s", address)
                name = None
            self._answer(address, name)

    def _answer(self, address: str, name: Optional[str]) -> None:
        name = name[:MAX_NAME_LENGTH] if isinstance(name, str) and name and name != address else None
        with self._lock:
            self.queries += 1
            if name is None:
                self.failures += 1
            self._cache.pop(address, None)
            while len(self._cache) >= self._cache_size:
                self._cache.popitem(last=False)  # the oldest answer
            self._cache[address] = (name, self.clock() + (self.positive_ttl if name else self.negative_ttl))
            self._pending.discard(address)
