"""Capture from a stream: a real tcpdump (pcap) or dumpcap (pcapng) writing to a pipe in a namespace, counted
as it arrives, equal to what the same capture wrote to a file; a stream sent in pieces is counted piece by
piece; a broken stream stops the capture with its error on ``GET /``.

Traffic only flows between the namespace pair's own addresses. The pipe goes through ``tee``, so the
file compared against holds exactly the bytes the exporter read.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.decode import LINKTYPE_ETHERNET
from testkit.live_traffic import generate_traffic, running_servers, send_udp, wait_for_line
from testkit.netns import NamespacePair, namespace_pair, netns_unavailable_reason
from testkit.process import get, running_exporter, terminate
from tests.capture_files import Pcapng, udp_frames

pytestmark = [pytest.mark.integration]
needs_namespaces = pytest.mark.skipif(netns_unavailable_reason() is not None, reason=netns_unavailable_reason() or "")

SUMMARIZE = [sys.executable, "-m", "exporter", "summarize"]
CAPTURED = re.compile(r"(?:(\d+) packets captured|Packets captured: (\d+))")  # tcpdump's, dumpcap's last words
DOWNLOAD_BYTES = 300_000
PROBE_SIZE = 211
PROBE_PAYLOAD = b"x" * PROBE_SIZE  # send_udp's payload


def tcpdump(pair: NamespacePair) -> list[str]:
    """tcpdump on the server end, writing pcap to stdout, each frame as soon as it is captured."""
    return ["tcpdump", "-i", pair.server_link, "-w", "-", "-U", "-n", "-Z", "root", "-B", "65536", "--immediate-mode"]


def dumpcap(pair: NamespacePair) -> list[str]:
    """dumpcap on the server end, writing pcapng (its default) to stdout."""
    return ["dumpcap", "-i", pair.server_link, "-w", "-"]


READY = {"tcpdump": "listening on", "dumpcap": "Capturing on"}


class PipedCapture:
    """A capture program in the server namespace writing to a pipe that ``tee`` copies into a file.

    ``stream`` is the read end of the pipe, for the exporter's standard input.
    """

    def __init__(self, pair: NamespacePair, argv: Sequence[str], copy: Path):
        self.copy = copy
        self.process = subprocess.Popen(pair.server_command(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.tee = subprocess.Popen(["tee", str(copy)], stdin=self.process.stdout, stdout=subprocess.PIPE)
        self.process.stdout.close()  # tee holds it now
        self.stream = self.tee.stdout
        self.stderr = io.TextIOWrapper(self.process.stderr)
        wait_for_line(self.process, self.stderr, READY[argv[0]], 20)

    def confirm_capturing(self, pair: NamespacePair, timeout: float = 10) -> None:
        """Send one datagram at a time until one reaches the copy: a program's "ready" line can precede capture."""
        deadline = time.monotonic() + timeout
        while not (self.copy.exists() and PROBE_PAYLOAD in self.copy.read_bytes()):
            assert time.monotonic() < deadline, f"{self.copy.name}: no probe captured within {timeout} s"
            send_udp(pair, count=1, size=PROBE_SIZE)
            time.sleep(0.2)

    def stop(self) -> int:
        """SIGINT: the capture program ends its file and exits, ending the stream; returns the frames it captured."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.tee.wait(15)
        said = self.stderr.read()
        found = CAPTURED.search(said)
        assert found, said
        return int(found.group(1) or found.group(2))

    def close(self) -> None:
        terminate(self.process)
        terminate(self.tee)
        self.stream.close()
        self.stderr.close()


@contextlib.contextmanager
def piped_capture(pair: NamespacePair, argv: Sequence[str], copy: Path) -> Iterator[PipedCapture]:
    capture = PipedCapture(pair, argv, copy)
    try:
        yield capture
    finally:
        capture.close()


def servers_of(pair: NamespacePair) -> list[str]:
    return ["--server-ip", pair.server_v4, "--server-ip", pair.server_v6]


def summarize_file(path: Path, servers: list[str]) -> dict:
    result = subprocess.run([*SUMMARIZE, str(path), "--format", "json", *servers], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def frames_of(summary: dict) -> int:
    return summary["packets"] + sum(summary["ignored"].values())


@needs_namespaces
@pytest.mark.parametrize("program, suffix", [(tcpdump, "pcap"), (dumpcap, "pcapng")],
                         ids=["tcpdump-pcap", "dumpcap-pcapng"])
def test_summarize_of_a_live_capture_stream_equals_summarize_of_its_file(tmp_path, program, suffix):
    if shutil.which(program.__name__) is None:
        pytest.skip(f"{program.__name__} is not installed")
    (tmp_path / "big.bin").write_bytes(bytes(range(256)) * (DOWNLOAD_BYTES // 256))
    with namespace_pair() as pair, running_servers(pair, tmp_path):
        with piped_capture(pair, program(pair), tmp_path / f"copy.{suffix}") as capture:
            counting = subprocess.Popen([*SUMMARIZE, "-", "--format", "json", *servers_of(pair)], stdin=capture.stream,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                capture.confirm_capturing(pair)
                generate_traffic(pair, tmp_path, "big.bin")
                captured = capture.stop()
                stdout, stderr = counting.communicate(timeout=60)
            finally:
                terminate(counting)
    assert counting.returncode == 0 and stderr == "", stderr
    from_stream = json.loads(stdout)
    assert capture.copy.read_bytes()[:4] == (b"\x0a\x0d\x0d\x0a" if suffix == "pcapng" else b"\xd4\xc3\xb2\xa1")
    assert from_stream == summarize_file(capture.copy, servers_of(pair))
    assert frames_of(from_stream) == captured  # every frame the capture program wrote
    clients = {client["ip"] for client in from_stream["clients"]}
    assert {pair.client_v4, pair.client_v6} <= clients and from_stream["total_bytes"] > DOWNLOAD_BYTES * 2


def metrics(base: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted label items) -> value."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(get(base + "/metrics").decode()) for sample in family.samples}


def counted(base: str) -> float:
    return metrics(base).get(("traffic_exporter_packets_total", (("result", "counted"),)), 0.0)


def client_series(base: str) -> dict[tuple[str, str, str], tuple[int, int]]:
    """(client, direction, protocol) -> (bytes, packets), from /metrics."""
    series: dict = {}
    for (name, labels), value in metrics(base).items():
        if name in ("traffic_client_bytes_total", "traffic_client_packets_total"):
            key = (dict(labels)["client"], dict(labels)["direction"], dict(labels)["protocol"])
            nbytes, packets = series.get(key, (0, 0))
            series[key] = (int(value), packets) if name.endswith("bytes_total") else (nbytes, int(value))
    return series


def summary_series(summary: dict) -> dict[tuple[str, str, str], tuple[int, int]]:
    """(client, direction) -> (bytes, packets) of a summary."""
    return {(client["ip"], direction): (client[f"bytes_{direction}"], client[f"packets_{direction}"])
            for client in summary["clients"] for direction in ("in", "out") if client[f"packets_{direction}"]}


def per_direction(series: dict) -> dict[tuple[str, str], tuple[int, int]]:
    totals: dict = {}
    for (client, direction, _protocol), (nbytes, packets) in series.items():
        before = totals.get((client, direction), (0, 0))
        totals[(client, direction)] = (before[0] + nbytes, before[1] + packets)
    return {key: value for key, value in totals.items() if value[1]}


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


@needs_namespaces
def test_serve_counts_a_tcpdump_stream_as_it_flows_and_a_stream_that_ends_is_a_finished_replay(tmp_path):
    with namespace_pair() as pair:
        with piped_capture(pair, tcpdump(pair), tmp_path / "copy.pcap") as capture:
            with running_exporter(["--pcap", "-", *servers_of(pair)], stdin=capture.stream) as (base, process):
                capture.stream.close()  # the exporter holds it
                assert counted(base) == 0
                for wave in range(1, 3):
                    before = counted(base)
                    send_udp(pair, count=5)  # 5 datagrams in (and the ICMP errors the kernel's rate limit lets out)
                    wait_for(lambda: counted(base) >= before + 5, 10, f"wave {wave} counted while tcpdump runs")
                    assert capture.process.poll() is None
                assert metrics(base)[("traffic_exporter_capture_up", ())] == 1
                captured = capture.stop()
                wait_for(lambda: metrics(base)[("traffic_exporter_capture_up", ())] == 0, 10, "the stream's end")
                status = json.loads(get(base + "/"))
                served = client_series(base)
                frames = sum(value for (name, _), value in metrics(base).items()
                             if name == "traffic_exporter_packets_total")
                assert process.poll() is None  # still serving what it counted
    assert status["capture"] == {"running": False, "source": "pcap:-", "error": None, "packets": frames, "dropped": 0}
    from_file = summarize_file(capture.copy, servers_of(pair))
    assert per_direction(served) == summary_series(from_file)
    assert frames == frames_of(from_file) == captured and from_file["packets"] >= 10


@contextlib.contextmanager
def serving_stream(*args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``--pcap -`` fed by the test through a pipe: (base URL, the process; write to its stdin)."""
    with running_exporter(["--pcap", "-", "--server-ip", "192.0.2.1", "--server-ip", "2001:db8::1", *args],
                          stdin=subprocess.PIPE) as (base, process):
        try:
            yield base, process
        finally:
            with contextlib.suppress(OSError):
                process.stdin.close()


def test_a_pcapng_stream_sent_slowly_in_pieces_is_counted_piece_by_piece():
    file = Pcapng()
    file.section()
    file.interface(LINKTYPE_ETHERNET)
    frames = udp_frames(90)
    ends = []
    for index, frame in enumerate(frames):
        file.enhanced(0, (1_700_000_000 + index) * 10**6, bytes(frame))
        ends.append(len(file.data))
    data = bytes(file.data)
    cuts = [ends[29] - 10, ends[59] + 17, len(data)]  # pieces end inside blocks: their last frame waits for the next
    with serving_stream() as (base, process):
        written = 0
        for cut in cuts:
            process.stdin.write(data[written:cut])
            process.stdin.flush()
            written = cut
            whole = sum(1 for end in ends if end <= written)
            wait_for(lambda: counted(base) >= whole, 10, f"{whole} frames counted")
            time.sleep(0.6)  # longer than the stream's idle period: nothing more may appear
            assert counted(base) == whole and metrics(base)[("traffic_exporter_capture_up", ())] == 1
        process.stdin.close()
        wait_for(lambda: metrics(base)[("traffic_exporter_capture_up", ())] == 0, 10, "the stream's end")
        assert counted(base) == 90 and json.loads(get(base + "/"))["capture"]["error"] is None


def test_a_broken_stream_stops_the_capture_with_its_error_on_the_status_page():
    file = Pcapng()
    file.section()
    file.interface(LINKTYPE_ETHERNET)
    for index, frame in enumerate(udp_frames(10)):
        file.enhanced(0, index, bytes(frame))
    offset = file.raw(struct.pack("<II", 6, 0xFFFFFFF0) + bytes(40))
    with serving_stream() as (base, process):
        process.stdin.write(bytes(file.data))
        process.stdin.flush()
        wait_for(lambda: f"at byte {offset}" in get(base + "/").decode(), 10, "the error on /")
        time.sleep(1.5)  # longer than the capture's first restart backoff: a stream is never read again
        status = json.loads(get(base + "/"))["capture"]
        seen = metrics(base)
        assert process.poll() is None
    assert status["running"] is False and status["error"].startswith(
        f"-: corrupt pcapng block at byte {offset}: block length 4294967280 ")
    assert seen[("traffic_exporter_packets_total", (("result", "counted"),))] == 10  # the frames before it
    assert seen[("traffic_exporter_capture_up", ())] == 0 and seen[("traffic_exporter_capture_restarts_total", ())] == 0
