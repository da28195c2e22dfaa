"""``--demo``: its configuration, the bundled capture scripts/make_demo_pcap.py writes, and the /dashboard page."""
from __future__ import annotations

import collections
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.utils import RawPcapReader

from compat_api.app import create_app
from compat_api.history import History
from exporter.capture import CaptureStatus
from exporter.config import ConfigError, parse_config, serve_config
from exporter.demo import DEMO_PCAP, DEMO_SERVER_IPS, demo_urls, print_demo_urls
from exporter.tally import Tally

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "make_demo_pcap.py"
STATIC = REPO_ROOT / "compat_api" / "static"
LABELS = {"HTTP", "HTTPS", "FTP", "SSH", "DNS", "OTHER"}


@pytest.fixture(scope="module")
def summary() -> dict:
    """What ``python -m exporter summarize`` counts in the bundled capture."""
    servers = [argument for ip in DEMO_SERVER_IPS for argument in ("--server-ip", ip)]
    command = [sys.executable, "-m", "exporter", "summarize", str(DEMO_PCAP), *servers, "--format", "json"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout)


def bytes_per_second(path: Path) -> list[int]:
    """Wire bytes of each second of a capture, from its first frame on."""
    seconds: collections.Counter = collections.Counter()
    first = None
    for _data, meta in RawPcapReader(str(path)):
        when = meta.sec + meta.usec / 1e6
        first = when if first is None else first
        seconds[int(when - first)] += meta.wirelen
    return [seconds[second] for second in range(max(seconds) + 1)]


def test_demo_config_replays_the_bundled_capture_in_a_loop_at_its_recorded_pace():
    config = serve_config(["--demo"], environ={})
    assert Path(config.pcap) == DEMO_PCAP and DEMO_PCAP.is_file()
    assert (config.replay_speed, config.loop, config.server_ips) == ("realtime", True, DEMO_SERVER_IPS)
    assert config.user is None and config.interface is None  # a replay opens no capture socket: no root needed


def test_demo_prints_the_dashboard_metrics_and_rest_urls():
    out = io.StringIO()
    config = serve_config(["--demo", "--listen", "127.0.0.1:9100"], environ={})
    print_demo_urls(config.listen_host, config.listen_port, out)
    for url in ("http://127.0.0.1:9100/dashboard", "http://127.0.0.1:9100/metrics", "http://127.0.0.1:9100/traffic"):
        assert url in out.getvalue()


@pytest.mark.parametrize("listen, base", [("0.0.0.0:8000", "http://localhost:8000"),
                                          ("[::]:8000", "http://localhost:8000"), ("[::1]:8001", "http://[::1]:8001")])
def test_demo_urls_name_a_host_a_browser_can_open(listen, base):
    config = parse_config(["--listen", listen], environ={})
    assert demo_urls(config.listen_host, config.listen_port) == [f"{base}/dashboard", f"{base}/metrics", f"{base}/traffic"]


@pytest.mark.parametrize("argv, flag", [(["--pcap", "x.pcap"], "--pcap"), (["--interface", "eth0"], "--interface"),
                                        (["--server-ip", "192.0.2.1"], "--server-ip"),
                                        (["--user", "nobody"], "--user")])
def test_demo_refuses_flags_that_choose_what_to_capture(argv, flag):
    with pytest.raises(ConfigError, match=f"^--demo: .*{flag}"):
        serve_config(["--demo", *argv], environ={})


def test_demo_flag_comes_from_the_command_line_or_traffic_demo():
    assert parse_config(["--demo"], environ={}).demo is True
    assert parse_config([], environ={"TRAFFIC_DEMO": "1"}).demo is True
    assert parse_config([], environ={}).demo is False


def test_demo_capture_is_small_and_has_every_label_both_directions_ipv4_and_ipv6_and_dozens_of_clients(summary):
    assert DEMO_PCAP.stat().st_size < 1_000_000
    assert summary["ignored"] == dict.fromkeys(summary["ignored"], 0)  # every frame is the demo servers'
    clients = summary["clients"]
    assert 30 <= len(clients) <= 60
    assert any(":" in client["ip"] for client in clients) and any("." in client["ip"] for client in clients)
    per_label = {label: sum(client["protocols"][label] for client in clients) for label in LABELS}
    assert all(per_label.values()), per_label
    assert sum(client["bytes_in"] for client in clients) > 100_000
    assert sum(client["bytes_out"] for client in clients) > 100_000


def test_demo_capture_lasts_two_to_three_minutes_with_bursts_and_quiet_spells():
    seconds = bytes_per_second(DEMO_PCAP)
    assert 120 <= len(seconds) <= 180
    assert max(seconds) >= 100_000  # a burst: at least 100 KB in one second
    assert sum(1 for nbytes in seconds if nbytes < 5_000) >= 20  # quiet seconds
    assert seconds[0] > 0  # a replay shows traffic from its first second


def test_make_demo_pcap_rebuilds_the_bundled_file_byte_for_byte(tmp_path):
    out = tmp_path / "demo.pcap"
    subprocess.run([sys.executable, str(SCRIPT), str(out)], cwd=REPO_ROOT, capture_output=True, timeout=120, check=True)
    assert out.read_bytes() == DEMO_PCAP.read_bytes(), "run: python scripts/make_demo_pcap.py"


@pytest.fixture
def client():
    status = CaptureStatus("pcap", str(DEMO_PCAP))
    return create_app(History(Tally(), 300), lambda: status, lambda: DEMO_SERVER_IPS).test_client()


def test_dashboard_is_an_html_page_that_loads_only_local_assets(client):
    response = client.get("/dashboard")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    page = response.get_data(as_text=True)
    assets = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert "static/dashboard.js" in assets and "static/dashboard.css" in assets
    for asset in assets:
        # relative, so the page also works behind a path prefix; data: only for the empty favicon
        assert asset == "data:," or not re.match(r"^(/|[a-z]+:)", asset), asset
    for asset in ("static/dashboard.js", "static/dashboard.css"):
        assert client.get("/" + asset).status_code == 200


def test_dashboard_script_and_style_fetch_nothing_from_elsewhere():
    for name in ("dashboard.html", "dashboard.js", "dashboard.css"):
        text = (STATIC / name).read_text(encoding="utf-8")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\(", text), name
    script = (STATIC / "dashboard.js").read_text(encoding="utf-8")
    paths = re.findall(r'getJson\(\s*[`"]([^`"]*)[`"]', script)
    assert {path.split("?")[0] for path in paths} == {"./", "traffic", "protocols", "traffic_history", "openapi.json"}


def test_landing_page_links_to_the_dashboard(client):
    page = client.get("/", headers={"Accept": "text/html"}).get_data(as_text=True)
    assert 'href="dashboard"' in page
