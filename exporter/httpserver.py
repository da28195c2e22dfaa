"""The HTTP server: waitress, bounded so that idle, slow or greedy clients cannot lock out a scrape.

waitress's defaults trust their clients, as behind a reverse proxy: at 100 connections it stops
accepting; its idle timeout restarts with every byte received, so a client sending a header line
every few seconds is never closed; request bodies up to 1 GiB are spooled to temporary files; and
all the requests pipelined in one read are parsed at once, their responses queued in memory while a
worker thread waits for the client to read them. Here:

- a connection has ``request_timeout`` seconds from its first byte to complete a request, and as
  long for each part of a response to be taken; one without a request is closed after ``idle_timeout``;
- at ``max_connections``, the connection that has waited longest on its client is closed to let a
  new one in, so a scrape gets through however many connections sit idle;
- the next pipelined request is read only once the previous response is handed to the kernel: a
  client that does not read holds one response and no worker thread;
- request headers and bodies (every endpoint is GET) are refused beyond small sizes (431, 413)
  before the application, and its authentication, sees them; nothing is spooled to disk;
- poll() instead of select(), which fails on descriptors above 1023.
"""
from __future__ import annotations

import heapq
import logging
import resource
import time
from typing import Callable, Optional

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer

from .config import ConfigError

log = logging.getLogger(__name__)

MAX_REQUEST_HEADER_BYTES = 16 << 10  # nginx allows 4 x 8 KiB; a scrape sends a few hundred bytes
MAX_REQUEST_BODY_BYTES = 1 << 10  # a body this large or larger gets 413: no endpoint reads one
# waitress spools a response over 1 MiB to a temporary file; a connection here holds one response at
# most, so keeping it in memory is bounded, and costs no disk writes and no second descriptor.
RESPONSE_IN_MEMORY_BYTES = 16 << 20
DESCRIPTORS_BESIDES_CONNECTIONS = 64  # listening socket, trigger, capture, pcap, state file, stdio, ...
SWEEP_SECONDS = 1.0  # how often connections are checked against their timeouts


class BoundedChannel(HTTPChannel):
    """An HTTP connection that reads one request at a time and knows how long it has waited on its client."""

    held = b""  # bytes received after the request being answered: pipelined requests, parsed later
    request_started = 0.0  # time.time() (waitress's clock) when the request being received began

    def waiting(self) -> Optional[tuple[float, bool]]:
        """``(since, idle)`` while the connection waits on its client; None while the application answers.

        Idle means waiting for a new request; otherwise it waits for the rest of a request, or for the
        client to take a response (or to be closed after one).
        """
        if self.total_outbufs_len or self.will_close or self.close_when_flushed:
            return self.last_activity, False  # last_activity moves with every byte sent
        if self.requests:
            return None
        if self.held:  # pipelined requests, held until the socket takes more output
            return self.last_activity, False
        if self.request is not None:
            return self.request_started, False
        return self.last_activity, True

    def readable(self) -> bool:
        return not self.held and super().readable()

    def writable(self) -> bool:
        # Held requests are parsed when the socket can take more output: a client that does not read
        # stops them in the kernel's buffers, not in ours.
        return bool(super().writable() or self._can_parse_held())

    def handle_write(self) -> None:
        if self._can_parse_held():
            held, self.held = self.held, b""
            self.received(held)
        super().handle_write()

    def _can_parse_held(self) -> bool:
        return bool(self.held and not self.requests and not self.total_outbufs_len
                    and not self.will_close and not self.close_when_flushed)

    def received(self, data: bytes) -> bool:
        """Parse ``data`` up to the end of one request and queue it; hold the rest until it is answered.

        waitress's own version parses every request in ``data``; otherwise the same.
        """
        with self.requests_lock:
            if self.will_close or self.close_when_flushed:
                return False
            while data and not self.requests:
                if self.request is None:
                    self.request = self.parser_class(self.adj)
                    self.request_started = time.time()
                consumed = self.request.received(data)
                if self.request.expect_continue and self.request.headers_finished and not self.sent_continue:
                    self.send_continue()
                if self.request.completed:
                    self.sent_continue = False
                    if not self.request.empty:
                        self.requests.append(self.request)
                        self.server.add_task(self)
                    self.request = None
                data = data[consumed:]
            self.held = data
        return True


class BoundedServer(TcpWSGIServer):
    """waitress's TCP server with timeouts measured from a request's start, and room made for new connections."""

    channel_class = BoundedChannel
    at_limit = False  # whether the last check found max_connections open (logged on each change)

    def __init__(self, app: Callable, adj: Adjustments, request_timeout: float):
        self.request_timeout = request_timeout
        self.next_sweep = 0.0
        super().__init__(app, adj=adj, sockinfo=adj.listen[0])

    def readable(self) -> bool:
        # Only whether to accept. Connections are closed between two polls (close_waiting), never here:
        # this runs while poll() walks the map, and a descriptor closed now could be reused by accept()
        # in the same round and then be closed as the old one's.
        if not self.accepting:
            return False
        return (len(self.active_channels) < self.adj.connection_limit
                or any(channel.waiting() for channel in self.active_channels.values()))

    def run(self) -> None:
        """Serve until SystemExit or KeyboardInterrupt, then stop the worker threads."""
        try:
            while self._map:
                wasyncore.poll2(self.adj.asyncore_loop_timeout, self._map)  # poll(): no 1024-descriptor limit
                self.close_waiting(time.time())
        except (SystemExit, KeyboardInterrupt):
            self.task_dispatcher.shutdown()

    def close_waiting(self, now: float) -> None:
        """Close the connections past their timeout, then the longest-waiting ones beyond max_connections."""
        limit = self.adj.connection_limit
        if now < self.next_sweep and len(self.active_channels) <= limit:
            return
        self.next_sweep = now + SWEEP_SECONDS
        waiting = []
        for channel in list(self.active_channels.values()):
            state = channel.waiting()
            if state is None:
                continue
            since, idle = state
            if now - since > (self.adj.channel_timeout if idle else self.request_timeout):
                log.debug("closing %s: %s for %.0f s", channel, "idle" if idle else "kept waiting", now - since)
                channel.handle_close()
            else:
                waiting.append((since, id(channel), channel))
        excess = len(self.active_channels) - limit
        for _since, _id, channel in heapq.nsmallest(max(excess, 0), waiting):
            channel.handle_close()
        if self.at_limit != (excess >= 0):
            self.at_limit = excess >= 0
            if self.at_limit:
                log.warning("%d HTTP connections open (--web-max-connections): each new one closes the one "
                            "that has waited longest on its client", limit)
            else:
                log.info("HTTP connections below --web-max-connections again")


def create_server(app: Callable, host: str, port: int, *, max_connections: int, request_timeout: int,
                  idle_timeout: int, ident: str, threads: int = 8) -> BoundedServer:
    """A bounded waitress server for ``app`` listening on host:port; OSError when it cannot listen."""
    make_room_for_descriptors(max_connections)
    adjustments = Adjustments(
        host=host, port=port, threads=threads, ident=ident, connection_limit=max_connections,
        channel_timeout=idle_timeout, max_request_header_size=MAX_REQUEST_HEADER_BYTES,
        max_request_body_size=MAX_REQUEST_BODY_BYTES, outbuf_overflow=RESPONSE_IN_MEMORY_BYTES)
    # Under load waitress warns for every queued request; a full, unread log pipe would stall serving.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    return BoundedServer(app, adjustments, request_timeout)


def make_room_for_descriptors(max_connections: int) -> None:
    """Raise the soft RLIMIT_NOFILE to fit ``max_connections``; ConfigError when the hard limit is too low."""
    needed = max_connections + DESCRIPTORS_BESIDES_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(f"--web-max-connections: {max_connections} connections need {needed} open files, "
                          f"but this process may open {hard} (ulimit -n); lower it or raise the limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
