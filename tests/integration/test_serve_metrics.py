"""Serve mode replaying a pcap at max speed: /metrics equals `summarize`, and promtool accepts it."""
import json
import shutil
import signal
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.process import get, running_exporter
from tests.builders import AFS_PCAP, AFS_SERVER, CORPUS_PCAPS, summarize

pytestmark = pytest.mark.integration


def scrape(base):
    series, results = {}, {}
    text = get(base + "/metrics").decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("traffic_client_bytes_total", "traffic_client_packets_total"):
                key = (sample.labels["client"], sample.labels["direction"], sample.labels["protocol"])
                series.setdefault(key, {})[sample.name] = int(sample.value)
            elif sample.name == "traffic_exporter_packets_total":
                results[sample.labels["result"]] = int(sample.value)
    return text, series, results


@pytest.mark.parametrize("pcap, server", [(AFS_PCAP.name, AFS_SERVER), ("mptcp-v0.pcap", "10.2.1.2"),
                                          ("ipv6-routing-header.pcap", "2200::244:212:3fff:feae:22f7")])
def test_metrics_equal_summarize(pcap, server):
    result = summarize(CORPUS_PCAPS / pcap, "--server-ip", server, "--format", "json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    frames = summary["packets"] + sum(summary["ignored"].values())
    with running_exporter(["--pcap", str(CORPUS_PCAPS / pcap), "--server-ip", server, "--replay-speed", "max"]) as (base, _):
        deadline = time.monotonic() + 20
        while sum(scrape(base)[2].values()) < frames and time.monotonic() < deadline:
            time.sleep(0.1)
        text, series, results = scrape(base)
    assert results == {"counted": summary["packets"], **summary["ignored"]}
    expected = {}
    for client in summary["clients"]:
        for direction in ("in", "out"):
            protocols = {}  # summarize gives bytes per protocol over both directions; rebuild per direction
            for (ip, dirn, protocol), values in series.items():
                if ip == client["ip"] and dirn == direction:
                    protocols[protocol] = values
            assert sum(v["traffic_client_bytes_total"] for v in protocols.values()) == client[f"bytes_{direction}"]
            assert sum(v["traffic_client_packets_total"] for v in protocols.values()) == client[f"packets_{direction}"]
        for protocol, nbytes in client["protocols"].items():
            expected[(client["ip"], protocol)] = nbytes
    got = {}
    for (ip, _direction, protocol), values in series.items():
        got[(ip, protocol)] = got.get((ip, protocol), 0) + values["traffic_client_bytes_total"]
    assert {k: v for k, v in expected.items() if v} == got
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
        assert check.returncode == 0 and check.stdout == b"" and check.stderr == b"", check


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_server_within_five_seconds(signum):
    with running_exporter(["--pcap", str(AFS_PCAP), "--loop"]) as (_base, process):
        started = time.monotonic()
        process.send_signal(signum)
        assert process.wait(5) == 0
        assert time.monotonic() - started < 5
