"""An address flood: one million distinct clients keep series, history and memory bounded, totals exact."""
import json
import struct
import time
from typing import Iterable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.decode import LINKTYPE_ETHERNET
from testkit.process import get, running_exporter
from tests.capture_files import pcap_header

pytestmark = pytest.mark.integration

FRAMES = 1_000_000
MAX_CLIENTS = 500
RSS_LIMIT_KIB = 250 * 1024
SERVER = bytes([192, 0, 2, 1])


ETHERNET_TO_SERVER = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"  # IPv4
RECORD = struct.Struct("<IIII")


def write_ethernet_pcap(path, frames: Iterable[bytes]) -> None:
    """``frames`` as an Ethernet pcap, 100,000 to a second, written 10,000 records at a time."""
    with open(path, "wb") as out:
        out.write(pcap_header(LINKTYPE_ETHERNET))
        chunk = []
        for index, frame in enumerate(frames):
            chunk.append(RECORD.pack(1_700_000_000 + index // 100_000, index % 100_000, len(frame), len(frame)) + frame)
            if len(chunk) == 10_000:
                out.write(b"".join(chunk))
                chunk = []
        out.write(b"".join(chunk))


def metrics_once_read(base: str, frames: int, timeout: float = 120) -> tuple[dict, str]:
    """/metrics (families by name, and the text) once the exporter has read ``frames`` frames, or at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        text = get(base + "/metrics").decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        if frames_read(families) >= frames or time.monotonic() > deadline:
            return families, text
        time.sleep(0.5)


def frames_read(families: dict) -> float:
    return sum(s.value for s in families["traffic_exporter_packets"].samples)


def write_flood_pcap(path) -> int:
    """One UDP frame from each of FRAMES distinct IPv4 sources to the server; return the total bytes."""
    udp = struct.pack("!HHHH", 40000, 53, 8, 0)
    frame_bytes = len(ETHERNET_TO_SERVER) + 20 + len(udp)
    write_ethernet_pcap(path, (ETHERNET_TO_SERVER + b"\x45\x00\x00\x1c\x00\x00\x00\x00\x40\x11\x00\x00"
                               + (0x0A000000 + index).to_bytes(4, "big")  # 10.0.0.0 upwards, all distinct
                               + SERVER + udp for index in range(FRAMES)))
    return FRAMES * frame_bytes


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def traffic_once_in_history(base: str, total: int, timeout: float = 30) -> dict:
    """/traffic once history ticks have taken ``total`` bytes (the last second's tick may still be due), or at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        body = json.loads(get(base + "/traffic?limit=1000&seconds=300"))
        if sum(c["total"] for c in body["clients"]) >= total or time.monotonic() > deadline:
            return body
        time.sleep(0.25)


def test_one_million_addresses_stay_bounded(tmp_path):
    pcap = tmp_path / "flood.pcap"
    total = write_flood_pcap(pcap)
    args = ["--pcap", str(pcap), "--server-ip", "192.0.2.1", "--max-clients", str(MAX_CLIENTS),
            "--log-level", "warning"]
    with running_exporter(args) as (base, process):
        families, _ = metrics_once_read(base, FRAMES)
        body = traffic_once_in_history(base, total)
        rss = peak_rss_kib(process.pid)
    assert frames_read(families) == FRAMES
    byte_series = families["traffic_client_bytes"].samples
    clients = {s.labels["client"] for s in byte_series}
    assert len(clients) == MAX_CLIENTS + 1 and "other" in clients
    assert sum(s.value for s in byte_series) == total
    tracked = families["traffic_exporter_tracked_clients"].samples[0].value
    assert tracked == MAX_CLIENTS
    assert len(body["clients"]) <= MAX_CLIENTS + 1
    assert sum(c["total"] for c in body["clients"]) == total
    assert rss < RSS_LIMIT_KIB, f"peak RSS {rss / 1024:.0f} MiB"


SYN_FLOOD_FRAMES = 1_000_000
MAX_TCP_FLOWS = 100_000  # the default


def write_syn_flood_pcap(path) -> None:
    """One TCP SYN to the server's port 443 from each of SYN_FLOOD_FRAMES distinct (address, port) pairs."""
    tcp = struct.Struct("!HHIIBBHHH")
    write_ethernet_pcap(path, (ETHERNET_TO_SERVER + b"\x45\x00\x00\x28\x00\x00\x00\x00\x40\x06\x00\x00"
                               + (0x0A000000 + index // 4).to_bytes(4, "big")  # 250,000 addresses, 4 ports each
                               + SERVER + tcp.pack(30000 + index % 4, 443, index, 0, 0x50, 0x02, 1024, 0, 0)
                               for index in range(SYN_FLOOD_FRAMES)))


def test_a_syn_flood_keeps_the_tcp_flow_table_at_its_cap_and_counts_evictions(tmp_path):
    pcap = tmp_path / "synflood.pcap"
    write_syn_flood_pcap(pcap)
    args = ["--pcap", str(pcap), "--server-ip", "192.0.2.1", "--log-level", "warning"]
    with running_exporter(args) as (base, process):
        counted = frames_read(metrics_once_read(base, SYN_FLOOD_FRAMES)[0])
        time.sleep(0.5)
        families = {f.name: f for f in text_string_to_metric_families(get(base + "/metrics").decode())}
        rss = peak_rss_kib(process.pid)
    value = lambda name: families[name].samples[0].value  # noqa: E731
    assert counted == SYN_FLOOD_FRAMES
    assert value("traffic_exporter_max_tcp_flows") == MAX_TCP_FLOWS
    assert value("traffic_exporter_tcp_flows") == MAX_TCP_FLOWS
    assert value("traffic_exporter_tcp_flow_evictions") == SYN_FLOOD_FRAMES - MAX_TCP_FLOWS
    # every evicted connection had only its SYN: none of their handshakes could be measured
    assert value("traffic_exporter_tcp_handshakes_unmeasured") == SYN_FLOOD_FRAMES - MAX_TCP_FLOWS
    assert sum(s.value for s in families["traffic_tcp_handshakes"].samples) == 0
    assert rss < RSS_LIMIT_KIB, f"peak RSS {rss / 1024:.0f} MiB"
