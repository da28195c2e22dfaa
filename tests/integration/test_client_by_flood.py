"""--client-by asn under the one-million-address flood: a few exact series, bounded memory, clean exposition."""
import ipaddress
import shutil
import subprocess

import pytest

from testkit.process import running_exporter
from tests.geoip_databases import true_record, write_database
from tests.integration.test_flood import (FRAMES, RSS_LIMIT_KIB, frames_read, metrics_once_read, peak_rss_kib,
                                         write_flood_pcap)

pytestmark = pytest.mark.integration

# The flood's sources are 10.0.0.0 + 0..999,999 (10.0.0.0 to 10.15.66.63): nested networks over them, one hole.
FLOOD_ASNS = {"10.0.0.0/12": {"autonomous_system_number": 64502, "autonomous_system_organization": "Outer"},
              "10.4.0.0/14": {"autonomous_system_number": 64503, "autonomous_system_organization": "Inner"},
              "10.6.0.0/15": {"autonomous_system_number": 64504},
              "10.15.0.0/16": {}}


def test_a_million_addresses_by_asn_give_exact_per_as_series_in_bounded_memory(tmp_path):
    pcap = tmp_path / "flood.pcap"
    total = write_flood_pcap(pcap)
    database = write_database(tmp_path / "asn.mmdb", FLOOD_ASNS, "GeoLite2-ASN")
    frame_bytes = total // FRAMES
    expected: dict[str, int] = {}
    first = int(ipaddress.IPv4Address("10.0.0.0"))
    for address in range(first, first + FRAMES, 1024):  # per 1024-address block (every network is aligned to it)
        record = true_record(FLOOD_ASNS, str(ipaddress.IPv4Address(address)))
        key = f"AS{record.get('autonomous_system_number', 0)}"
        expected[key] = expected.get(key, 0) + min(1024, first + FRAMES - address) * frame_bytes
    args = ["--pcap", str(pcap), "--server-ip", "192.0.2.1", "--geoip-db", str(database), "--client-by", "asn",
            "--log-level", "warning"]
    with running_exporter(args) as (base, process):
        families, text = metrics_once_read(base, FRAMES)
        rss = peak_rss_kib(process.pid)
    assert frames_read(families) == FRAMES
    by_client: dict[str, float] = {}
    for sample in families["traffic_client_bytes"].samples:
        by_client[sample.labels["client"]] = by_client.get(sample.labels["client"], 0) + sample.value
    assert by_client == expected
    info = {s.labels["client"]: s.labels for s in families["traffic_client_info"].samples}
    assert info["AS64503"]["as_org"] == "Inner" and info["AS0"]["asn"] == ""
    assert rss < RSS_LIMIT_KIB, f"peak RSS {rss / 1024:.0f} MiB"
    if shutil.which("promtool"):
        result = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
        assert result.returncode == 0 and not result.stdout and not result.stderr, result
