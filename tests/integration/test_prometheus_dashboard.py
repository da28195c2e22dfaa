"""Every Grafana panel query returns data from a real Prometheus scraping the exporter and running the rules.

The exporter replays a synthetic pcap in a loop at its recorded pace (the benchmark's frames with
a few TCP connections woven in: handshakes, retransmissions and resets, for the TCP health row);
Prometheus scrapes it every second with prometheus/traffic.rules.yml loaded, so raw series, recording rules and Prometheus'
own per-target series (up, scrape_duration_seconds) all exist when the panels are queried.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Iterator

import pytest

from bench.generate import SERVER_V4, SERVER_V6, friendly_frames, write_frames
from tests.dashboard_queries import panel_queries
from testkit.process import free_port, get, running_exporter, terminate

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "grafana" / "dashboards" / "traffic.json"
RULES_FILE = REPO_ROOT / "prometheus" / "traffic.rules.yml"
JOB = "traffic-exporter"  # the alerts in traffic.rules.yml select up{job="traffic-exporter"}

PCAP_FRAMES = 20_000
PCAP_CLIENTS = 50
# The generator stamps 100k frames/s, more than the exporter replays on a small CI machine: the
# "realtime" replay would run flat out, and the busy capture thread slows scrapes towards the 1 s
# timeout (a failed scrape marks every series stale). At 10k frames/s a loop lasts 2 s, the pace is
# really the recorded one and every rate stays above zero.
REPLAY_FRAMES_PER_SECOND = 10_000
DEADLINE_SECONDS = 60.0  # from Prometheus' start until every panel query has data
# Recording rules the panels read; each must have been evaluated once before the panels are queried.
RECORDING_RULES = (
    "client_direction:traffic_client_bytes:rate5m",
    "protocol:traffic_bytes:rate5m",
    "direction:traffic_bytes:rate5m",
    "direction:traffic_packets:rate5m",
    "instance:traffic_tcp_retransmitted_segments_per_segments:ratio_rate5m",
    "client:traffic_client_tcp_handshake_rtt_seconds:p90_rate5m",
)
# rate()/increase() need two samples inside their window; the shortest window the panels use is
# $__rate_interval, which panel_queries substitutes as 1m. Every exporter series comes from the same
# scrapes, so counting the samples of one metric is enough.
READY_QUERIES = (
    f'up{{job="{JOB}"}} == 1',
    f'min(count_over_time(traffic_client_bytes_total{{job="{JOB}"}}[1m])) >= 2',
    *(f'{rule}{{job="{JOB}"}}' for rule in RECORDING_RULES),
)
# Panel queries (as panel_queries returns them) allowed to return no series -> the reason. None is:
# counters that stay at 0 in a replay (kernel drops, evictions, restarts) still give a series.
EXEMPT_PANEL_QUERIES: dict[str, str] = {}

# TCP connections woven into the replay: (client, handshake RTT in frame gaps, payload segments out,
# which of them are sent twice, who resets). At 10k frames/s a gap is 0.1 ms: RTTs of 10, 50 and 200 ms.
TCP_CONNECTIONS = (("10.99.200.1", 100, 30, (4, 17, 25), "client"),
                   ("10.99.200.2", 500, 20, (), "server"),
                   ("fd00:99::200:3", 2000, 15, (9,), "client"))


def tcp_connection_frames(client: str, rtt_gaps: int, segments: int, resent: tuple[int, ...],
                          resetter: str, start: int) -> dict[int, bytes]:
    """Frame position -> frame of one connection to the server's port 80 starting at position ``start``."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    ip = (IPv6(src=client, dst=SERVER_V6), IPv6(src=SERVER_V6, dst=client)) if ":" in client else \
        (IP(src=client, dst=SERVER_V4), IP(src=SERVER_V4, dst=client))
    ether_in, ether_out = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01"), Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    client_isn, server_isn, port = 1000, 5000, 40000

    def inbound(**tcp):
        return bytes(ether_in / ip[0] / TCP(sport=port, dport=80, **tcp))

    def outbound(payload: bytes = b"", **tcp):
        return bytes(ether_out / ip[1] / TCP(sport=80, dport=port, **tcp) / payload)

    frames = {start: inbound(flags="S", seq=client_isn),
              start + 1: outbound(flags="SA", seq=server_isn, ack=client_isn + 1),
              start + 1 + rtt_gaps: inbound(flags="A", seq=client_isn + 1, ack=server_isn + 1)}
    position = start + 2 + rtt_gaps
    sent = [*range(segments), *resent]  # the resent ones again at the end: retransmissions
    for index in sent:
        frames[position] = outbound(b"d" * 1000, flags="PA", seq=server_isn + 1 + 1000 * index, ack=client_isn + 1)
        position += 3
    end = server_isn + 1 + 1000 * segments
    frames[position] = (inbound(flags="R", seq=client_isn + 1) if resetter == "client"
                        else outbound(flags="R", seq=end))
    return frames


def write_replay_pcap(path: Path) -> None:
    """The benchmark's friendly frames with ``TCP_CONNECTIONS`` woven in, stamped at the replay pace."""
    woven: dict[int, bytes] = {}
    for number, connection in enumerate(TCP_CONNECTIONS):
        woven.update(tcp_connection_frames(*connection, start=100 + 3000 * number))
    friendly = friendly_frames(PCAP_FRAMES, clients=PCAP_CLIENTS, seed=1)
    total = PCAP_FRAMES + len(woven)
    assert max(woven) < total
    write_frames(str(path), (woven[i] if i in woven else next(friendly) for i in range(total)),
                 REPLAY_FRAMES_PER_SECOND)


if shutil.which("prometheus") is None:
    pytest.skip("the prometheus binary is not installed (Debian package prometheus)", allow_module_level=True)


def instant_query(prometheus_url: str, expr: str) -> dict:
    """Evaluate ``expr`` at the current time through /api/v1/query; return the decoded answer."""
    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        return json.loads(get(url))
    except urllib.error.HTTPError as error:  # 400/422 carry the PromQL error in the body
        return json.loads(error.read())


def is_ready(prometheus_url: str) -> bool:
    try:
        get(prometheus_url + "/-/ready", timeout=1)
        return True
    except OSError:
        return False


def write_prometheus_config(path: Path, exporter_address: str) -> None:
    """A one-job config scraping the exporter every second, evaluating the repo's rules every second."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(RULES_FILE)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [exporter_address]}]}],
    }
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML


@contextlib.contextmanager
def scraping_prometheus(tmp_path: Path, exporter_url: str) -> Iterator[str]:
    """A real Prometheus scraping the exporter at ``exporter_url``, with data in it: its URL; stopped after."""
    config_path = tmp_path / "prometheus.yml"
    write_prometheus_config(config_path, urllib.parse.urlsplit(exporter_url).netloc)
    prometheus_url = f"http://127.0.0.1:{free_port()}"
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={config_path}",
             f"--web.listen-address={urllib.parse.urlsplit(prometheus_url).netloc}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_data(prometheus_url, prometheus, log_path, time.monotonic() + DEADLINE_SECONDS)
        yield prometheus_url
    finally:
        terminate(prometheus)


def wait_for_data(prometheus_url: str, prometheus: subprocess.Popen, log_path: Path, deadline: float) -> None:
    """Poll until every READY_QUERIES expression has a result; fail with the ones that still have none."""
    while True:
        if prometheus.poll() is not None:
            raise AssertionError(f"prometheus exited with {prometheus.returncode}:\n{log_tail(log_path)}")
        waiting = ["/-/ready"]
        if is_ready(prometheus_url):
            waiting = [expr for expr in READY_QUERIES
                       if not instant_query(prometheus_url, expr).get("data", {}).get("result")]
            if not waiting:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"no data after {DEADLINE_SECONDS:.0f} s for: {waiting}\n"
                                 f"{target_health(prometheus_url)}\n{log_tail(log_path)}")
        time.sleep(0.25)


def failing_panel_queries(prometheus_url: str, queries: list[tuple[str, str]]) -> tuple[list[str], bool]:
    """Evaluate every panel query once; return the failures and whether any is a PromQL error."""
    failures, errors = [], False
    for title, expr in queries:
        answer = instant_query(prometheus_url, expr)
        if answer.get("status") != "success":
            failures.append(f"{title!r}: {answer.get('errorType')}: {answer.get('error')}\n    {expr}")
            errors = True
        elif not answer["data"]["result"] and expr not in EXEMPT_PANEL_QUERIES:
            failures.append(f"{title!r}: no series\n    {expr}")
    return failures, errors


def target_health(prometheus_url: str) -> str:
    """The scrape target's health, last error and last scrape duration, for failure messages."""
    try:
        targets = json.loads(get(prometheus_url + "/api/v1/targets"))["data"]["activeTargets"]
    except OSError as error:
        return f"targets unavailable: {error}"
    return "; ".join(f"target {target['scrapeUrl']}: {target['health']}, last scrape "
                     f"{target['lastScrapeDuration']:.3f} s, error {target['lastError']!r}" for target in targets)


def log_tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def test_every_dashboard_panel_query_returns_data_from_real_prometheus(tmp_path):
    queries = panel_queries(DASHBOARD)
    assert queries, f"{DASHBOARD} has no panel query"
    pcap = tmp_path / "traffic.pcap"
    write_replay_pcap(pcap)
    exporter_args = ["--pcap", str(pcap), "--server-ip", SERVER_V4, "--server-ip", SERVER_V6,
                     "--loop", "--replay-speed", "realtime", "--log-level", "warning"]
    with running_exporter(exporter_args) as (exporter_url, _exporter):
        with scraping_prometheus(tmp_path, exporter_url) as prometheus_url:
            deadline = time.monotonic() + DEADLINE_SECONDS
            # Re-evaluated until the deadline: one slow scrape makes the raw series stale until the next.
            while True:
                failures, errors = failing_panel_queries(prometheus_url, queries)
                if not failures or errors or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert not failures, (f"{len(failures)} of {len(queries)} panel queries failed:\n"
                                  + "\n".join(failures) + "\n" + target_health(prometheus_url))

            client_bytes = instant_query(prometheus_url, f'sum(traffic_client_bytes_total{{job="{JOB}"}})')
            assert client_bytes["status"] == "success" and client_bytes["data"]["result"], client_bytes
            assert float(client_bytes["data"]["result"][0]["value"][1]) > 0
            capture_up = instant_query(prometheus_url, f'traffic_exporter_capture_up{{job="{JOB}"}}')
            assert capture_up["status"] == "success", capture_up
            assert [float(series["value"][1]) for series in capture_up["data"]["result"]] == [1.0], \
                (capture_up, target_health(prometheus_url))
