"""Serve mode replaying a file: loops keep the recorded pace, empty files idle, no file is counted twice."""
import contextlib
import pathlib
import struct
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from exporter.decode import LINKTYPE_ETHERNET
from testkit.process import free_port, get, terminate
from tests.builders import MACS
from tests.capture_files import ENHANCED_PACKET, Pcapng, pcap_header

pytestmark = pytest.mark.integration
SERVER = "192.0.2.1"


@contextlib.contextmanager
def serving(*args: str) -> Iterator[tuple[str, subprocess.Popen, pathlib.Path]]:
    """``python -m exporter --pcap ...`` on a free loopback port: its base URL, process and log file; always stopped."""
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        log = pathlib.Path(directory) / "exporter.log"
        with open(log, "wb") as output:
            process = subprocess.Popen([sys.executable, "-m", "exporter", *args, "--server-ip", SERVER,
                                        "--listen", f"127.0.0.1:{port}"], stdout=output, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while True:
                assert process.poll() is None, log.read_text()
                try:
                    get(base + "/metrics", timeout=1)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "exporter did not answer in time"
                    time.sleep(0.1)
            yield base, process, log
        finally:
            terminate(process)


def frames_seen(base: str) -> dict[str, float]:
    """Frames the exporter handled (every result), capture up, restarts, from /metrics."""
    seen = {"frames": 0.0}
    for family in text_string_to_metric_families(get(base + "/metrics").decode()):
        for sample in family.samples:
            if sample.name == "traffic_exporter_packets_total":
                seen["frames"] += sample.value
            elif sample.name in ("traffic_exporter_capture_up", "traffic_exporter_capture_restarts_total"):
                seen[sample.name] = sample.value
    return seen


def cpu_seconds(process: subprocess.Popen) -> float:
    """User and system CPU time the process used so far (Linux /proc)."""
    fields = pathlib.Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime: clock ticks of 1/100 s on Linux


def udp_frame(index: int):
    packet = Ether(**MACS) / IP(src=f"192.0.2.{2 + index % 5}", dst=SERVER) / UDP(sport=40000 + index, dport=53)
    packet.time = 1_700_000_000
    return packet


@pytest.mark.parametrize("speed", ["max", "realtime"])
def test_an_empty_file_in_a_loop_idles_after_one_log_line(tmp_path, speed):
    path = tmp_path / "empty.pcap"
    path.write_bytes(pcap_header(LINKTYPE_ETHERNET))
    with serving("--pcap", str(path), "--loop", "--replay-speed", speed) as (base, process, log):
        time.sleep(1)
        used = cpu_seconds(process)
        time.sleep(2)
        assert cpu_seconds(process) - used < 0.2  # under 10% of a core: idle, not replaying nothing in a loop
        seen = frames_seen(base)
        assert seen["frames"] == 0 and seen["traffic_exporter_capture_up"] == 0
        assert log.read_text().count("holds no frames") == 1


def test_a_one_frame_realtime_loop_replays_it_once_a_second(write_pcap):
    path = write_pcap("one.pcap", [udp_frame(0)])
    with serving("--pcap", str(path), "--loop", "--replay-speed", "realtime") as (base, _process, _log):
        first = frames_seen(base)["frames"]
        time.sleep(3)
        assert 2 <= frames_seen(base)["frames"] - first <= 4


def test_simple_packet_blocks_are_replayed_and_counted_once(tmp_path):
    file = Pcapng()
    file.section()
    file.interface(LINKTYPE_ETHERNET)
    for index in range(30):
        if index % 2:
            file.simple(bytes(udp_frame(index)))
        else:
            file.enhanced(0, 1_700_000_000 * 10**6 + index, bytes(udp_frame(index)))
    path = file.write(tmp_path / "simple.pcapng")
    with serving("--pcap", str(path)) as (base, _process, _log):
        deadline = time.monotonic() + 10
        while frames_seen(base)["frames"] < 30 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.5)  # longer than the capture's first restart backoff: a restart would count it again
        seen = frames_seen(base)
    assert seen == {"frames": 30, "traffic_exporter_capture_up": 0, "traffic_exporter_capture_restarts_total": 0}


def test_a_corrupt_pcapng_stops_the_replay_with_its_error_and_is_not_counted_again(tmp_path):
    file = Pcapng()
    file.section()
    file.interface(LINKTYPE_ETHERNET)
    for index in range(10):
        file.enhanced(0, 1_700_000_000 * 10**6 + index, bytes(udp_frame(index)))
    offset = file.raw(struct.pack("<II", ENHANCED_PACKET, 0xFFFFFFF0) + bytes(40))
    path = file.write(tmp_path / "corrupt.pcapng")
    with serving("--pcap", str(path)) as (base, _process, log):
        deadline = time.monotonic() + 10
        while f"at byte {offset}" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.5)
        seen = frames_seen(base)
        status = get(base + "/").decode()
        logged = log.read_text()
    assert seen == {"frames": 10, "traffic_exporter_capture_up": 0, "traffic_exporter_capture_restarts_total": 0}
    assert logged.count("corrupt pcapng block") == 1 and f"corrupt pcapng block at byte {offset}" in status
