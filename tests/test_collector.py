"""TrafficCollector: every metric of docs/architecture.md from one snapshot, valid exposition per promtool."""
import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.capture import CaptureStatus
from exporter.collector import TrafficCollector, build_registry
from exporter.tally import Tally
from tests.builders import batch_counts


SERVERS = ("192.0.2.1", "2001:db8::/64")


def tally_with_traffic():
    tally = Tally(max_clients=1)
    tally.record(batch_counts({("198.51.100.7", "in", "HTTP"): (1500, 3), ("2001:db8::7", "out", "DNS"): (80, 1)},
                              {"not_ip": 2}))
    return tally


def running_replay() -> CaptureStatus:
    return CaptureStatus("pcap", "x.pcap", running=True)


def samples(registry):
    found = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_collector_exposes_client_series_results_and_health():
    registry = CollectorRegistry()
    registry.register(TrafficCollector(tally_with_traffic(), running_replay, lambda: SERVERS))
    found = samples(registry)
    labels = (("client", "198.51.100.7"), ("direction", "in"), ("protocol", "HTTP"))
    assert found[("traffic_client_bytes_total", labels)] == 1500
    assert found[("traffic_client_packets_total", labels)] == 3
    other = (("client", "other"), ("direction", "out"), ("protocol", "DNS"))
    assert found[("traffic_client_bytes_total", other)] == 80
    assert found[("traffic_exporter_packets_total", (("result", "counted"),))] == 4
    assert found[("traffic_exporter_packets_total", (("result", "not_ip"),))] == 2
    assert found[("traffic_exporter_packets_total", (("result", "malformed"),))] == 0
    assert found[("traffic_exporter_capture_up", ())] == 1
    assert found[("traffic_exporter_tracked_clients", ())] == 1
    assert found[("traffic_exporter_max_clients", ())] == 1
    assert found[("traffic_exporter_kernel_dropped_packets_total", ())] == 0
    assert found[("traffic_exporter_capture_restarts_total", ())] == 0
    assert found[("traffic_exporter_client_evictions_total", ())] == 0
    assert found[("traffic_exporter_capture_info", (("filter", ""), ("interface", "x.pcap"), ("source", "pcap")))] == 1
    assert any(name == "traffic_exporter_build_info" for name, _ in found)
    assert found[("traffic_exporter_server_address_info", (("address", "192.0.2.1"),))] == 1
    assert found[("traffic_exporter_server_address_info", (("address", "2001:db8::/64"),))] == 1
    # the exact totals: every (direction, protocol) pair, present from the start
    assert found[("traffic_bytes_total", (("direction", "in"), ("protocol", "HTTP")))] == 1500
    assert found[("traffic_packets_total", (("direction", "out"), ("protocol", "DNS")))] == 1
    assert found[("traffic_bytes_total", (("direction", "out"), ("protocol", "FTP")))] == 0
    assert sum(1 for name, _ in found if name == "traffic_bytes_total") == 12


def test_registry_includes_process_and_platform_collectors():
    names = {name for name, _ in samples(build_registry(Tally(), running_replay, lambda: SERVERS))}
    assert "process_cpu_seconds_total" in names and "python_info" in names


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed (Debian package prometheus)")
def test_promtool_check_metrics_reports_nothing():
    text = generate_latest(build_registry(tally_with_traffic(), running_replay, lambda: SERVERS))
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert result.returncode == 0 and result.stdout == b"" and result.stderr == b"", result
