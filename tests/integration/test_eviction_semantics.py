"""Through evictions, what Prometheus computes from the client series never exceeds the real traffic.

A looping replay at its recorded pace brings 20 clients in turns, each active for one second of
every four, to an exporter tracking at most 5 clients idle for at most 1 second: clients are
admitted, counted as ``other`` while the table is full, evicted and admitted again, over and over.
Scraping every quarter second, the test adds up what ``increase()`` would over every series (a new
series counts from zero, a lower value is a reset) and compares it with the exact total counter.
"""
import struct
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.decode import LINKTYPE_ETHERNET
from testkit.process import get, running_exporter
from tests.capture_files import pcap_header

pytestmark = pytest.mark.integration

SERVER = bytes([192, 0, 2, 1])
CLIENTS = 20
SCRAPE_INTERVAL = 0.25
SCRAPES = 48  # 12 seconds: three passes of the 4-second file


def write_turns_pcap(path) -> None:
    """Client i sends 10 HTTP frames during second i % 4 of a 4-second capture."""
    ether = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"
    records = []
    for second in range(4):
        for tenth in range(10):
            for client in range(1, CLIENTS + 1):
                if client % 4 != second:
                    continue
                payload = b"x" * (client * 10)
                ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0, 64, 6, 0,
                                 bytes([198, 51, 100, client]), SERVER)
                tcp = struct.pack("!HHIIBBHHH", 40000 + client, 80, 0, 0, 0x50, 0x18, 1024, 0, 0)
                frame = ether + ip + tcp + payload
                records.append(struct.pack("<IIII", 1_700_000_000 + second, tenth * 100_000, len(frame), len(frame))
                               + frame)
    with open(path, "wb") as out:
        out.write(pcap_header(LINKTYPE_ETHERNET))
        out.write(b"".join(records))


def scrape(base: str) -> tuple[dict, int, int]:
    """Client byte series, the exact byte total and the eviction count, from one scrape."""
    series, total, evictions = {}, 0, 0
    for family in text_string_to_metric_families(get(base + "/metrics").decode()):
        for sample in family.samples:
            if sample.name == "traffic_client_bytes_total":
                series[tuple(sorted(sample.labels.items()))] = int(sample.value)
            elif sample.name == "traffic_bytes_total":
                total += int(sample.value)
            elif sample.name == "traffic_exporter_client_evictions_total":
                evictions = int(sample.value)
    return series, total, evictions


def test_prometheus_increase_over_client_series_never_counts_a_byte_twice(tmp_path):
    pcap = tmp_path / "turns.pcap"
    write_turns_pcap(pcap)
    args = ["--pcap", str(pcap), "--server-ip", "192.0.2.1", "--loop", "--replay-speed", "realtime",
            "--max-clients", "5", "--client-idle-seconds", "1"]
    with running_exporter(args) as (base, _process):
        previous, first_total, first_evictions = scrape(base)
        increase = 0
        for _ in range(SCRAPES):
            time.sleep(SCRAPE_INTERVAL)
            current, total, evictions = scrape(base)
            for key, value in current.items():
                before = previous.get(key, 0)
                increase += value - before if value >= before else value
            previous = current
    real = total - first_total
    assert evictions - first_evictions >= 10, "the replay must evict clients for this test to mean anything"
    assert real > 0
    assert increase == real, f"increase over client series / real traffic = {increase / real:.3f}"
