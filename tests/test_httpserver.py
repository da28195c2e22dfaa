"""The bounded waitress server, run in this process on 127.0.0.1: pipelining, worker threads, file descriptors."""
import contextlib
import resource
import socket
import subprocess
import sys
import threading
import time

from waitress import wasyncore

from exporter.httpserver import DESCRIPTORS_BESIDES_CONNECTIONS, create_server
from tests.builders import AFS_PCAP
from testkit.process import free_port

RESPONSE = b"x" * (1 << 20)


def large_response(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(RESPONSE)))])
    return [RESPONSE]


def echo_path(environ, start_response):
    body = (environ["PATH_INFO"] + ":" + environ["wsgi.input"].read().decode()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@contextlib.contextmanager
def serving(app, threads: int = 8, request_timeout: int = 10):
    """Serve ``app`` on a free loopback port from a thread; stop and close everything on the way out."""
    server = create_server(app, "127.0.0.1", 0, ident="test", threads=threads, max_connections=16,
                           request_timeout=request_timeout, idle_timeout=60)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def close_everything():  # runs in the server's thread, between two polls
        for channel in list(server.active_channels.values()):
            channel.handle_close()
        wasyncore.close_all(server._map)

    try:
        yield int(server.effective_port), server
    finally:
        server.trigger.pull_trigger(close_everything)
        thread.join(5)
        server.task_dispatcher.shutdown(timeout=2)


def get(port: int, path: str = "/", headers: bytes = b"", body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"GET %s HTTP/1.0\r\n%s\r\n%s" % (path.encode(), headers, body))
        response = b""
        with contextlib.suppress(ConnectionResetError):  # after refusing a request, unread bytes and all
            while chunk := sock.recv(1 << 20):
                response += chunk
    return response


def slow_reader(port: int) -> socket.socket:
    """A connection to which the kernel buffers a few KB (small window and segments), like a distant client."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.connect(("127.0.0.1", port))
    return sock


def test_a_client_that_pipelines_without_reading_holds_no_worker_thread_and_one_response():
    with serving(large_response, threads=1) as (port, server), slow_reader(port) as hoarder:
        hoarder.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 40)  # 40 MiB of responses, never read
        time.sleep(0.5)
        response = get(port)  # would wait forever for the only worker, blocked on the hoarder
        queued = max(channel.total_outbufs_len for channel in list(server.active_channels.values()))
    assert response.startswith(b"HTTP/1.0 200 OK") and response.endswith(RESPONSE)
    assert queued <= len(RESPONSE)


def test_a_client_that_does_not_read_its_response_is_closed_after_the_request_timeout():
    with serving(large_response, request_timeout=1) as (port, server), slow_reader(port) as stalled:
        stalled.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sent = time.monotonic()
        while not server.active_channels and time.monotonic() - sent < 1:  # accepted by now, surely
            time.sleep(0.01)
        while server.active_channels and time.monotonic() - sent < 3:
            time.sleep(0.05)
        waited = time.monotonic() - sent
    assert 1 <= waited < 2.5  # the timeout, then the next check: they run once a second


def test_pipelined_requests_are_all_answered_in_order():
    requests = b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % number for number in range(50))
    requests += b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    requests += b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with serving(echo_path) as (port, _server), socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(requests)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in received.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [b"/%d:" % number for number in range(50)] + [b"/body:hello", b"/last:"]


def test_request_headers_beyond_16_kib_get_431_and_a_body_beyond_1_kib_413():
    with serving(echo_path) as (port, _server):
        headers = get(port, "/", b"X-Padding: %s\r\n" % (b"x" * (16 << 10)))
        body = get(port, "/", b"Content-Length: 1024\r\n")
        small = get(port, "/", b"Content-Length: 1023\r\n", b"y" * 1023)
    assert headers.startswith(b"HTTP/1.0 431 ") and body.startswith(b"HTTP/1.0 413 ")
    assert small.startswith(b"HTTP/1.0 200 OK") and small.endswith(b"/:" + b"y" * 1023)


def test_the_soft_descriptor_limit_is_raised_to_fit_the_connections():
    code = ("import resource; from exporter.httpserver import make_room_for_descriptors\n"
            "make_room_for_descriptors(1000); print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (100, 4096)))
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == 1000 + DESCRIPTORS_BESIDES_CONNECTIONS


def test_more_connections_than_the_hard_descriptor_limit_allows_is_one_line_and_exit_2():
    argv = ["--pcap", str(AFS_PCAP), "--listen", f"127.0.0.1:{free_port()}", "--web-max-connections", "1000"]
    result = subprocess.run([sys.executable, "-m", "exporter", *argv], capture_output=True, text=True, timeout=30,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == ("traffic-exporter: --web-max-connections: 1000 connections need "
                                              "1064 open files, but this process may open 256 (ulimit -n); "
                                              "lower it or raise the limit")
