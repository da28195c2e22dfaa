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
from tests.tcp_traffic import tcp_health_tally


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


def test_tcp_health_families_per_client_in_other_and_in_exact_totals(tmp_path):
    tally, expected = tcp_health_tally(tmp_path, max_clients=2)  # 10.0.0.2 and 10.0.0.3; the rest is other
    registry = CollectorRegistry()
    registry.register(TrafficCollector(tally, running_replay, lambda: SERVERS))
    found = samples(registry)
    a = expected["10.0.0.2"]
    assert found[("traffic_client_tcp_handshakes_total", (("client", "10.0.0.2"), ("protocol", "HTTP")))] == 1
    for name, key in (("segments", "segments"), ("retransmitted_segments", "retransmitted"), ("resets", "resets")):
        for direction in ("in", "out"):
            labels = (("client", "10.0.0.2"), ("direction", direction))
            assert found[(f"traffic_client_tcp_{name}_total", labels)] == a[key][direction]
            others = sum(expected[c][key][direction] for c in ("fd00::3", "10.0.0.4"))
            assert found[(f"traffic_client_tcp_{name}_total", (("client", "other"), ("direction", direction)))] == others
            assert found[(f"traffic_tcp_{name}_total", (("direction", direction),))] == sum(
                truth[key][direction] for truth in expected.values())
    # 12.3 ms: in the 25 ms bucket and above, not in the 10 ms one
    rtt = "traffic_client_tcp_handshake_rtt_seconds"
    assert found[(f"{rtt}_bucket", (("client", "10.0.0.2"), ("le", "0.01")))] == 0
    assert found[(f"{rtt}_bucket", (("client", "10.0.0.2"), ("le", "0.025")))] == 1
    assert found[(f"{rtt}_bucket", (("client", "10.0.0.2"), ("le", "+Inf")))] == 1
    assert found[(f"{rtt}_sum", (("client", "10.0.0.2"),))] == pytest.approx(0.0123, abs=1e-6)
    assert found[(f"{rtt}_count", (("client", "other"),))] == 1  # fd00::3's 0.7 s; 10.0.0.4 completed none
    all_rtts = sorted(r for truth in expected.values() for r in truth["rtt"])
    assert found[("traffic_tcp_handshake_rtt_seconds_count", ())] == len(all_rtts)
    assert found[("traffic_tcp_handshake_rtt_seconds_bucket", (("le", "0.05"),))] == sum(r <= 0.05 for r in all_rtts)
    assert found[("traffic_tcp_handshake_rtt_seconds_sum", ())] == pytest.approx(sum(all_rtts), abs=1e-5)
    assert found[("traffic_tcp_handshakes_total", (("protocol", "SSH"),))] == 1
    assert found[("traffic_tcp_handshakes_total", (("protocol", "DNS"),))] == 0  # every label, from the start
    assert found[("traffic_exporter_tcp_flows", ())] == 5
    assert found[("traffic_exporter_max_tcp_flows", ())] == 1000
    assert found[("traffic_exporter_tcp_flow_evictions_total", ())] == 0
    assert found[("traffic_exporter_tcp_handshakes_unmeasured_total", ())] == 0


def test_without_tcp_health_there_is_no_tcp_family():
    names = {name for name, _ in samples(build_registry(tally_with_traffic(), running_replay, lambda: SERVERS))}
    assert not [name for name in names if "tcp" in name]


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed (Debian package prometheus)")
def test_promtool_check_metrics_reports_nothing_with_tcp_health(tmp_path):
    text = generate_latest(build_registry(tcp_health_tally(tmp_path)[0], running_replay, lambda: SERVERS))
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert result.returncode == 0 and result.stdout == b"" and result.stderr == b"", result
