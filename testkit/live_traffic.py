"""Real servers and clients for live-capture tests, run inside a ``NamespacePair``.

Every loop is bounded in count and time; every socket has a timeout; traffic only goes between
the pair's own addresses.
"""
from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from testkit.process import terminate
from testkit.netns import NamespacePair

# Dual-stack servers: HTTP on 80 and 8080 (serving a file larger than the MTU, so TSO/GRO
# aggregates appear), TCP sinks on 443 and 22, a UDP responder on 53. Exits after 120 s at most.
SERVERS_SCRIPT = r'''
import functools, http.server, socket, socketserver, sys, threading, time

class DualStackHTTP(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

class Sink(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(5)
        for _ in range(10000):
            if not self.request.recv(65536):
                break

class DualStackTCP(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

def udp_responder():
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 53))
    sock.settimeout(1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            query, peer = sock.recvfrom(4096)
        except socket.timeout:
            continue
        sock.sendto(b"answer:" + query[:64], peer)

handler = functools.partial(QuietHandler, directory=sys.argv[1])
servers = [DualStackHTTP(("::", 80), handler), DualStackHTTP(("::", 8080), handler),
           DualStackTCP(("::", 443), Sink), DualStackTCP(("::", 22), Sink)]
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
threading.Thread(target=udp_responder, daemon=True).start()
print("ready", flush=True)
time.sleep(120)
'''

# Client side, everything but curl: TCP sends to the sinks, UDP queries, and ping when the ping
# command is missing (raw ICMP echo, three per family).
CLIENT_SCRIPT = r'''
import socket, struct, sys, time
server_v4, server_v6, use_ping = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
for address in (server_v4, server_v6):
    for port, size in ((443, 5000), (22, 700)):
        with socket.create_connection((address, port), timeout=5) as sock:
            sock.sendall(b"s" * size)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(5)
            sock.recv(10)  # the sink closes: wait for its FIN so the exchange is over
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        for size in (40, 90, 300):
            sock.sendto(b"q" * size, (address, 53))
            sock.recvfrom(4096)

def checksum(data):
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF

if use_ping:
    for family, proto, echo, reply, address in ((socket.AF_INET, socket.IPPROTO_ICMP, 8, 0, server_v4),
                                                (socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, 129, server_v6)):
        with socket.socket(family, socket.SOCK_RAW, proto) as sock:
            sock.settimeout(2)
            for sequence in range(1, 4):
                body = struct.pack("!BBHHH", echo, 0, 0, 0x7E57, sequence) + b"p" * 56
                if family == socket.AF_INET:  # the kernel fills ICMPv6 checksums itself
                    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
                sock.sendto(body, (address, 0))
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline:
                    packet = sock.recv(2048)
                    icmp = packet[(packet[0] & 0x0F) * 4:] if family == socket.AF_INET else packet
                    if icmp[0] == reply and struct.unpack("!H", icmp[6:8])[0] == sequence:
                        break
print("done", flush=True)
'''


def wait_for_line(process: subprocess.Popen, stream, needle: str, timeout: float) -> str:
    """Read ``stream`` until a line containing ``needle``; AssertionError after ``timeout`` or on exit.

    Reads the pipe's descriptor, not the stream: select() cannot see lines a buffered reader already
    holds, so after a readline() that buffered two lines at once it would wait for the second in vain.
    """
    descriptor = stream.fileno()
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([descriptor], [], [], 0.2)
        if ready:
            chunk = os.read(descriptor, 65536)
            if not chunk:
                break
            seen += chunk
            for line in seen.decode(errors="replace").splitlines(keepends=True):
                if needle in line and line.endswith("\n"):
                    return line
        elif process.poll() is not None:
            break
    raise AssertionError(f"did not see {needle!r} within {timeout} s (exit {process.poll()}): "
                         f"{seen.decode(errors='replace')}")


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; Python does not name it


@contextlib.contextmanager
def shared_frame_timestamps() -> Iterator[None]:
    """While held, every packet socket (the exporter's, tcpdump's) sees the kernel's one timestamp of a frame.

    Unless some socket asked for receive timestamps, the kernel stamps no frame and each packet
    socket reads the clock itself when the frame reaches it: two captures of one frame then differ
    by scheduling jitter, tens of microseconds under load, which round-trip comparisons cannot
    tell from an error. One socket with SO_TIMESTAMPNS makes the kernel stamp each frame once --
    except a frame that already carries a time: a TCP segment that crossed a veth from another
    namespace keeps its sender's departure time, and every socket still reads the clock for it.
    """
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        holder.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        time.sleep(0.1)  # the kernel switches stamping on from a work item
        yield
    finally:
        holder.close()


@contextlib.contextmanager
def running_servers(pair: NamespacePair, directory: Path) -> Iterator[subprocess.Popen]:
    """The servers of SERVERS_SCRIPT in the server namespace, serving ``directory``."""
    script = directory / "servers.py"
    script.write_text(SERVERS_SCRIPT)
    process = subprocess.Popen(pair.server_command(sys.executable, str(script), str(directory)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(process, process.stdout, "ready", 20)
        yield process
    finally:
        terminate(process)


def generate_traffic(pair: NamespacePair, directory: Path, download: str) -> None:
    """curl to :80 and :8080 over both families, TCP sends to 443/22, UDP to 53, three pings per family."""
    for url in (f"http://{pair.server_v4}:80/{download}", f"http://[{pair.server_v6}]:80/{download}",
                f"http://{pair.server_v4}:8080/", f"http://[{pair.server_v6}]:8080/"):
        pair.client("curl", "-sS", "-o", "/dev/null", "--max-time", "10", url)
    script = directory / "client.py"
    script.write_text(CLIENT_SCRIPT)
    ping = shutil.which("ping")
    pair.client(sys.executable, str(script), pair.server_v4, pair.server_v6, "0" if ping else "1", timeout=30)
    if ping:
        pair.client(ping, "-4", "-c", "3", "-i", "0.2", "-W", "2", pair.server_v4)
        pair.client(ping, "-6", "-c", "3", "-i", "0.2", "-W", "2", pair.server_v6)


def inject_vlan_frames(pair: NamespacePair, count: int = 4) -> dict[str, list[int]]:
    """Send 802.1Q- and 802.1ad (QinQ)-tagged UDP frames from the client end; return their lengths by kind.

    The server kernel strips the outer tag before packet sockets see the frame (veth does not keep
    tags in band); nothing answers them (no VLAN device), so each one is a lone ``in`` frame.
    """
    code = f"""
from scapy.all import Ether, Dot1Q, Dot1AD, IP, IPv6, UDP, sendp
frames = []
ether = Ether(src="{pair.client_mac}", dst="{pair.server_mac}")
for i in range({count}):
    frames.append(ether / Dot1Q(vlan=10, prio=3) / IP(src="{pair.client_v4}", dst="{pair.server_v4}")
                  / UDP(sport=40000 + i, dport=53) / (b"v" * (20 + i)))
    frames.append(ether / Dot1AD(vlan=20) / Dot1Q(vlan=30) / IPv6(src="{pair.client_v6}", dst="{pair.server_v6}")
                  / UDP(sport=41000 + i, dport=443) / (b"w" * (30 + i)))
sendp(frames, iface="{pair.client_link}", verbose=False)
print(",".join(str(len(frame)) for frame in frames))
"""
    result = pair.client(sys.executable, "-c", code, timeout=60)
    lengths = [int(length) for length in result.stdout.strip().split(",")]
    return {"802.1Q": lengths[0::2], "QinQ": lengths[1::2]}


def send_udp(pair: NamespacePair, count: int = 5, size: int = 200) -> None:
    """Datagrams from the client to the server's port 53 (nothing listens: the server answers ICMP)."""
    pair.client(sys.executable, "-c",
                "import socket\n"
                f"s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"for _ in range({count}): s.sendto(b'x' * {size}, ('{pair.server_v4}', 53))\n")


def dns_in_bytes(exporter: "NamespacedExporter", pair: NamespacePair) -> int:
    return exporter.client_series().get((pair.client_v4, "in", "DNS"), (0, 0))[0]


class Tcpdump:
    """``tcpdump -w`` on the server end, started and confirmed listening before traffic."""

    def __init__(self, pair: NamespacePair, output: Path, interface: str = "", options: Sequence[str] = ()):
        self.output = output
        self.process = subprocess.Popen(
            pair.server_command("tcpdump", "-i", interface or pair.server_link, "-w", str(output), "-U", "-n",
                                "-Z", "root", "-B", "65536",  # KiB: room for 64 KiB GRO/TSO aggregates
                                "--immediate-mode", *options),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for_line(self.process, self.process.stderr, "listening on", 20)
        self.summary: Optional[str] = None

    def stop(self) -> str:
        """SIGINT, wait for the file to be complete; returns tcpdump's statistics lines."""
        if self.process.poll() is None:
            self.process.send_signal(2)
        try:
            _, self.summary = self.process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, self.summary = self.process.communicate(timeout=5)
        return self.summary


class NamespacedExporter:
    """``python -m exporter`` running in the server namespace, scraped from inside it with curl."""

    def __init__(self, pair: NamespacePair, args: list[str], *, port: int = 18000, user_wrapper: tuple = ()):
        self.pair = pair
        self.port = port
        argv = [*user_wrapper, sys.executable, "-m", "exporter", *args, "--listen", f"127.0.0.1:{port}"]
        self.process = subprocess.Popen(pair.server_command(*argv), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)

    def get(self, path: str) -> Optional[str]:
        result = self.pair.server("curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{self.port}{path}",
                                  check=False)
        return result.stdout if result.returncode == 0 else None

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics: (name, sorted label items) -> value; {} when it does not answer."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.get("/metrics")
        samples = {}
        for family in text_string_to_metric_families(text or ""):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def root(self) -> dict:
        import json

        return json.loads(self.get("/") or "{}")

    def client_series(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """(client, direction, protocol) -> (bytes, packets) from /metrics."""
        series: dict = {}
        for (name, labels), value in self.metrics().items():
            if name in ("traffic_client_bytes_total", "traffic_client_packets_total"):
                key = (dict(labels)["client"], dict(labels)["direction"], dict(labels)["protocol"])
                nbytes, packets = series.get(key, (0, 0))
                series[key] = (int(value), packets) if name.endswith("bytes_total") else (nbytes, int(value))
        return series

    def value(self, name: str, default: float = -1.0) -> float:
        return self.metrics().get((name, ()), default)

    def wait_until(self, condition, timeout: float, what: str):
        """Poll ``condition()`` every 0.2 s until truthy; AssertionError naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"exporter exited ({self.process.returncode}) while waiting for {what}: "
                                     f"{self.process.stderr.read()}")
            result = condition()
            if result:
                return result
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def wait_ready(self, timeout: float = 30) -> None:
        self.wait_until(lambda: self.value("traffic_exporter_capture_up") == 1, timeout, "capture_up 1")

    def wait_quiet(self, timeout: float = 15, quiet: float = 1.0) -> None:
        """Wait until the frame counters stop moving for ``quiet`` seconds (the socket is drained)."""
        deadline = time.monotonic() + timeout
        previous, since = None, time.monotonic()
        while time.monotonic() < deadline:
            # Counted frames only: scraping makes loopback frames, which an "any" capture sees (not_server).
            frames = self.metrics().get(("traffic_exporter_packets_total", (("result", "counted"),)))
            if frames is None:
                pass  # not answering right now: keep waiting
            elif frames != previous:
                previous, since = frames, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.25)
        raise AssertionError(f"exporter counters still moving after {timeout} s")

    def stop(self) -> str:
        """Stop it; return its stderr."""
        terminate(self.process)
        return self.process.stderr.read()


REPO_ROOT = Path(__file__).resolve().parents[1]
