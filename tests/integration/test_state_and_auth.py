"""Serve mode with --state-file (survives a restart) and --web-config (every endpoint needs a password)."""
import base64
import json
import time
import urllib.error
import urllib.request

import bcrypt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.process import get, running_exporter
from tests.builders import AFS_PCAP, AFS_SERVER, expected_summary

pytestmark = pytest.mark.integration
EXPECTED_BYTES = expected_summary(AFS_PCAP.name)["total_bytes"]
ENDPOINTS = ["/", "/traffic", "/protocols", "/traffic_history", "/openapi.json", "/metrics", "/dashboard"]


def counted_bytes(base, opener=urllib.request.urlopen):
    with opener(base + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "traffic_client_bytes_total")


def wait_for_bytes(base, expected, timeout=20):
    deadline = time.monotonic() + timeout
    while counted_bytes(base) != expected:
        assert time.monotonic() < deadline, f"{counted_bytes(base)} bytes counted, expected {expected}"
        time.sleep(0.1)


def history_bytes(base):
    return sum(bucket["total"] for bucket in json.loads(get(base + "/traffic_history?seconds=300"))["buckets"])


def wait_for_history_bytes(base, expected, timeout=20):
    """Wait until history ticks have moved ``expected`` bytes into the history."""
    deadline = time.monotonic() + timeout
    while history_bytes(base) < expected:
        assert time.monotonic() < deadline, f"{history_bytes(base)} bytes in the history, expected {expected}"
        time.sleep(0.1)


def test_state_file_carries_counters_across_a_restart(tmp_path):
    state = tmp_path / "state.json"
    args = ["--pcap", str(AFS_PCAP), "--server-ip", AFS_SERVER, "--state-file", str(state)]
    with running_exporter(args) as (base, process):
        wait_for_bytes(base, EXPECTED_BYTES)
        wait_for_history_bytes(base, EXPECTED_BYTES)
        process.terminate()
        assert process.wait(5) == 0
    saved = json.loads(state.read_text())
    assert saved["format"] == "traffic-exporter-state" and saved["history"]
    with running_exporter(args) as (base, _):
        wait_for_bytes(base, 2 * EXPECTED_BYTES)  # restored counters plus a second replay
        assert history_bytes(base) >= EXPECTED_BYTES


def test_corrupt_state_file_means_a_fresh_start(tmp_path):
    state = tmp_path / "state.json"
    state.write_text('{"format": "traffic-exporter-state", "version": 1, "tally": {"clients": 7}')
    with running_exporter(["--pcap", str(AFS_PCAP), "--server-ip", AFS_SERVER, "--state-file", str(state)]) as (base, _):
        wait_for_bytes(base, EXPECTED_BYTES)


@pytest.fixture(scope="module")
def protected(tmp_path_factory):
    web_config = tmp_path_factory.mktemp("web") / "web.yml"
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    web_config.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    with running_exporter(["--pcap", str(AFS_PCAP), "--server-ip", AFS_SERVER, "--web-config", str(web_config)],
                          ready_path=None) as (base, _):
        yield base


def status_of(url, user=None, password=None):
    request = urllib.request.Request(url)
    if user is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.headers


@pytest.mark.parametrize("path", ENDPOINTS)
def test_every_endpoint_needs_the_password(protected, path):
    status, headers = status_of(protected + path)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    assert status_of(protected + path, "prometheus", "wrong")[0] == 401
    assert status_of(protected + path, "nobody", "s3cret")[0] == 401
    assert status_of(protected + path, "prometheus", "s3cret")[0] == 200
