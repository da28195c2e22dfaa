"""The REST API of a real exporter process (waitress, capture thread, history ticker) on 127.0.0.1.

- the four views agree with /metrics once a replay is over;
- schemathesis finds no server error and no response outside the OpenAPI document;
- 50 concurrent clients for 10 s while a large replay runs: no error, exact totals at the end.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import CacheConfig
from schemathesis.specs.openapi.checks import response_schema_conformance
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import RawPcapWriter

from exporter.decode import LINKTYPE_ETHERNET
from testkit.process import running_exporter
from tests.builders import CORPUS_PCAPS, MACS, expected_summary

pytestmark = pytest.mark.integration

ROOT = Path(__file__).absolute().parents[2]
CONTRACT_PCAP = CORPUS_PCAPS / "mptcp-v0.pcap"
CONTRACT_SERVER = "10.2.1.2"
ENDPOINTS = ["/", "/traffic?limit=1000", "/protocols", "/traffic_history?seconds=300"]
START_TIMEOUT = 20.0
LOAD_THREADS = 50
LOAD_SECONDS = 10.0
LOAD_MAX_REQUESTS_PER_THREAD = 20_000
LOAD_FRAMES = 200_000
LOAD_SERVER = "192.0.2.1"


def get_json(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=10) as response:
        assert response.status == 200
        assert response.headers.get_content_type() == "application/json"
        return json.load(response)


def metrics_bytes_total(base: str) -> int:
    """Sum of every ``traffic_client_bytes_total`` series."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("traffic_client_bytes_total{")))


@contextlib.contextmanager
def exporter(pcap: Path, server_ip: str, speed: str = "max") -> Iterator[str]:
    """Run ``python -m exporter`` replaying ``pcap`` (at max speed); yield its base URL; always stop it."""
    args = ["--pcap", str(pcap), "--server-ip", server_ip, "--replay-speed", speed, "--log-level", "warning"]
    with running_exporter(args, cwd=ROOT, ready_timeout=START_TIMEOUT) as (base, _process):
        yield base


def wait_for_replay_in_history(base: str, timeout: float = 60.0) -> None:
    """Wait until the replay has ended, ticks have moved all its bytes into the history and an idle second follows."""
    deadline = time.monotonic() + timeout
    while get_json(base, "/")["capture"]["running"]:
        assert time.monotonic() < deadline, "replay did not finish"
        time.sleep(0.2)
    counted = metrics_bytes_total(base)
    while True:
        buckets = get_json(base, "/traffic_history?seconds=300")["buckets"]
        if buckets and buckets[-1]["total"] == 0 and sum(bucket["total"] for bucket in buckets) == counted:
            return
        assert time.monotonic() < deadline, f"the history never held the {counted} bytes counted"
        time.sleep(0.2)


def assert_contiguous(buckets: list[dict]) -> None:
    stamps = [bucket["timestamp"] for bucket in buckets]
    assert stamps == list(range(stamps[0], stamps[0] + len(stamps))), stamps


@pytest.fixture(scope="module")
def contract_server() -> Iterator[str]:
    with exporter(CONTRACT_PCAP, CONTRACT_SERVER) as base:
        wait_for_replay_in_history(base)
        yield base


def test_views_agree_with_metrics_after_replay(contract_server):
    base = contract_server
    expected = expected_summary(CONTRACT_PCAP.name)["total_bytes"]
    assert metrics_bytes_total(base) == expected
    traffic = get_json(base, "/traffic?limit=1000")
    assert sum(client["total"] for client in traffic["clients"]) == expected
    assert get_json(base, "/protocols")["total_bytes"] == expected
    history = get_json(base, "/traffic_history?seconds=300")
    buckets = history["buckets"]
    assert sum(bucket["total"] for bucket in buckets) == expected
    assert_contiguous(buckets)
    assert buckets[-1]["total"] == 0  # idle seconds after the replay are zero-filled, not skipped
    assert buckets[-1]["timestamp"] <= time.time() - 1
    assert traffic["window"] == len(buckets)


def test_index_describes_the_replay(contract_server):
    body = get_json(contract_server, "/")
    assert body["server_ip"] == CONTRACT_SERVER
    assert body["capture"]["source"] == f"pcap:{CONTRACT_PCAP}"
    assert body["capture"]["running"] is False and body["capture"]["error"] is None
    assert body["capture"]["packets"] == 264


def test_metrics_and_api_share_one_server(contract_server):
    with urllib.request.urlopen(contract_server + "/metrics", timeout=10) as response:
        assert b"traffic_exporter_capture_up" in response.read()
    request = urllib.request.Request(contract_server + "/", headers={"Accept": "text/html"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers.get_content_type() == "text/html"


@pytest.fixture(scope="module")
def api_schema(contract_server):
    # no cache: schemathesis would otherwise leave a .schemathesis/ directory in the work tree
    config = schemathesis.Config(cache=CacheConfig(enabled=False))
    return schemathesis.openapi.from_url(contract_server + "/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_no_server_error_or_schema_violation(case):
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance], timeout=10)


# --- load ----------------------------------------------------------------------------------------

def write_load_pcap(path: Path, frames: int) -> int:
    """A pcap of ``frames`` frames from a few clients and protocols; return their total wire bytes."""
    templates = [
        bytes(Ether(**MACS) / IP(src="198.51.100.1", dst=LOAD_SERVER) / TCP(sport=40001, dport=80) / (b"a" * 400)),
        bytes(Ether(**MACS) / IP(src=LOAD_SERVER, dst="198.51.100.1") / TCP(sport=443, dport=40002) / (b"b" * 1200)),
        bytes(Ether(**MACS) / IP(src="198.51.100.2", dst=LOAD_SERVER) / UDP(sport=5353, dport=53) / (b"c" * 40)),
        bytes(Ether(**MACS) / IP(src=LOAD_SERVER, dst="198.51.100.3") / TCP(sport=22, dport=40003) / (b"d" * 90)),
        bytes(Ether(**MACS) / IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP()),  # not the server: ignored
        bytes(Ether(**MACS) / IP(src="198.51.100.4", dst=LOAD_SERVER) / UDP(sport=9, dport=9999)),
    ]
    counted = 0
    with RawPcapWriter(str(path), linktype=LINKTYPE_ETHERNET) as writer:
        writer.write_header(None)
        for index in range(frames):
            data = templates[index % len(templates)]
            wire_length = len(data) + index % 5  # orig_len beyond the captured bytes counts too
            # 40,000 frames a second: at their recorded pace, the replay lasts half the load
            writer.write_packet(data, sec=1_700_000_000 + index // 40_000, usec=index % 40_000 * 25,
                                wirelen=wire_length)
            if index % len(templates) != 4:
                counted += wire_length
    return counted


def hammer(base: str, deadline: float, results: dict, lock: threading.Lock) -> None:
    """Request the four endpoints in turn until ``deadline``; tally requests, errors and running flags."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    requests = errors = running = 0
    try:
        for count in range(LOAD_MAX_REQUESTS_PER_THREAD):
            if time.monotonic() >= deadline:
                break
            path = ENDPOINTS[count % len(ENDPOINTS)]
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                body = json.loads(response.read())
                requests += 1
                if response.status != 200:
                    errors += 1
                elif path == "/":
                    running += body["capture"]["running"]
                elif path.startswith("/traffic_history") and body["buckets"]:
                    assert_contiguous(body["buckets"])
            except Exception as error:  # noqa: BLE001 - any failure is counted, the load goes on
                errors += 1
                with lock:
                    results["samples"].append(repr(error))
                connection.close()
                connection = http.client.HTTPConnection(host, int(port), timeout=10)
    finally:
        connection.close()
        with lock:
            results["requests"] += requests
            results["errors"] += errors
            results["running"] += running


def test_fifty_concurrent_clients_during_replay(tmp_path):
    pcap = tmp_path / "load.pcap"
    expected = write_load_pcap(pcap, LOAD_FRAMES)
    results = {"requests": 0, "errors": 0, "running": 0, "samples": []}
    lock = threading.Lock()
    with exporter(pcap, LOAD_SERVER, "realtime") as base:
        deadline = time.monotonic() + LOAD_SECONDS
        threads = [threading.Thread(target=hammer, args=(base, deadline, results, lock), daemon=True)
                   for _ in range(LOAD_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LOAD_SECONDS + 30)
        assert not any(thread.is_alive() for thread in threads)
        wait_for_replay_in_history(base)
        assert metrics_bytes_total(base) == expected
        assert get_json(base, "/protocols")["total_bytes"] == expected
        history = get_json(base, "/traffic_history?seconds=300")["buckets"]
        assert sum(bucket["total"] for bucket in history) == expected
    assert results["errors"] == 0, results["samples"][:5]
    assert results["requests"] >= LOAD_THREADS * len(ENDPOINTS)
    assert results["running"] > 0, "the replay was over before the load began"


@pytest.mark.parametrize("client_by", ["ip", "country"])
def test_traffic_with_databases_matches_the_schema_and_the_databases(tmp_path, client_by):
    """With --geoip-db, /traffic entries carry asn/as_org/country as maxminddb reads them, in the documented shape."""
    import maxminddb
    from openapi_schema_validator import OAS30Validator

    from tests.geoip_databases import write_database

    asn = write_database(tmp_path / "asn.mmdb", {
        "10.0.0.0/8": {"autonomous_system_number": 64496, "autonomous_system_organization": "Ten Net"},
        "10.2.0.0/16": {"autonomous_system_number": 64497}}, "GeoLite2-ASN")
    country = write_database(tmp_path / "country.mmdb", {"10.0.0.0/9": {"country": {"iso_code": "DE"}},
                                                        "10.1.0.0/16": {"country": {"iso_code": "FR"}}},
                             "GeoLite2-Country")
    args = ["--pcap", str(CONTRACT_PCAP), "--server-ip", CONTRACT_SERVER, "--log-level", "warning",
            "--geoip-db", f"{asn},{country}", "--client-by", client_by]
    with running_exporter(args, cwd=ROOT, ready_timeout=START_TIMEOUT) as (base, _process):
        wait_for_replay_in_history(base)
        traffic = get_json(base, "/traffic?limit=1000")
        components = get_json(base, "/openapi.json")["components"]
    OAS30Validator({"$ref": "#/components/schemas/Traffic", "components": components}).validate(traffic)
    assert sum(client["total"] for client in traffic["clients"]) == expected_summary(CONTRACT_PCAP.name)["total_bytes"]
    if client_by == "country":  # both clients (10.1.1.2, 10.1.2.2) are in 10.1.0.0/16
        assert [entry["ip"] for entry in traffic["clients"]] == ["FR"]
    else:
        assert {entry["ip"]: entry.get("country") for entry in traffic["clients"]} == {"10.1.1.2": "FR",
                                                                                     "10.1.2.2": "FR"}
    readers = maxminddb.open_database(str(asn)), maxminddb.open_database(str(country))
    for entry in traffic["clients"]:
        if client_by == "country":
            assert set(entry) & {"hostname", "asn", "as_org", "country"} <= {"country"}  # no AS facts for a country
            continue
        asn_record, country_record = (reader.get(entry["ip"]) or {} for reader in readers)
        assert entry.get("asn") == asn_record.get("autonomous_system_number")
        assert entry.get("as_org") == asn_record.get("autonomous_system_organization")
        assert entry.get("country") == country_record.get("country", {}).get("iso_code")
