"""The legacy REST API (docs/architecture.md) through Flask's test client, one fresh app per test."""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from compat_api.app import create_app
from compat_api.history import History
from exporter.classify import DEFAULT_PORT_LABELS, ServerSet, protocol_labels
from exporter.capture import CaptureStatus

from exporter.replay import PcapSource
from exporter.engine import FrameCounter
from exporter.tally import Tally
from tests.builders import CORPUS_PCAPS, Frame, MACS, count_frames, expected_summary, frame_of

SERVER = "192.0.2.1"
LABELS = list(protocol_labels(DEFAULT_PORT_LABELS))
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"
ENDPOINTS = ["/", "/traffic", "/protocols", "/traffic_history"]
SECONDS_ENDPOINTS = ["/traffic", "/protocols", "/traffic_history"]


def tcp_in(client: str, port: int, size: int = 0) -> Frame:
    return frame_of(Ether(**MACS) / IP(src=client, dst=SERVER) / TCP(sport=40000, dport=port) / (b"x" * size))


def tcp_out(client: str, port: int, size: int = 0) -> Frame:
    return frame_of(Ether(**MACS) / IP(src=SERVER, dst=client) / TCP(sport=port, dport=40000) / (b"x" * size))


def udp_out(client: str, port: int, size: int = 0) -> Frame:
    return frame_of(Ether(**MACS) / IP(src=SERVER, dst=client) / UDP(sport=port, dport=40000) / (b"x" * size))


def not_server() -> Frame:
    return frame_of(Ether(**MACS) / IP(src="203.0.113.1", dst="203.0.113.2") / UDP(sport=1, dport=2))


def feed(tally: Tally, frames: list[Frame]) -> None:
    """Count frames into the tally as the capture thread does."""
    tally.record(count_frames(frames, ServerSet([SERVER])))


# Seconds 999..1002: traffic in 999, idle 1000 and 1001 (a missed tick, zero-filled), traffic in 1002.
FIRST = [tcp_in("198.51.100.10", 80, 1000), udp_out("198.51.100.20", 53, 200)]
LAST = [tcp_in("198.51.100.30", 22, 300), tcp_out("198.51.100.10", 443, 50)]
SIZE = {name: f.wire_length for name, f in
        zip(["http", "dns", "ssh", "https"], FIRST + LAST)}


def build_history(tally: Tally, seconds: int = 300) -> History:
    """The standard scenario: four one-second buckets, the middle two empty."""
    history = History(tally, seconds)
    feed(tally, FIRST + [not_server()])
    history.tick(1000.5)
    history.tick(1001.5)
    feed(tally, LAST)
    history.tick(1003.5)
    return history


def make_client(history: History, status: CaptureStatus = CaptureStatus("pcap", "x.pcap"),
                servers: tuple[str, ...] = (SERVER,), cors_origins: tuple[str, ...] = ("*",)):
    return create_app(history, lambda: status, lambda: servers, cors_origins).test_client()


@pytest.fixture
def client(tally):
    return make_client(build_history(tally))


@pytest.fixture
def openapi_components():
    return json.loads((Path(__file__).parents[1] / "compat_api" / "openapi.json").read_text())["components"]


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --- GET / ---------------------------------------------------------------------------------------

def test_index_reports_servers_and_capture_health(tally):
    status = CaptureStatus("pcap", "x.pcap", running=True, frames=5, kernel_dropped=3)
    response = make_client(build_history(tally), status, servers=(SERVER, "2001:db8::1")).get("/")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert list(body) == ["message", "time", "server_ip", "server_ips", "capture"]
    assert body["message"] == "Backend (real capture) OK"
    assert isinstance(body["time"], float)
    assert body["server_ip"] == SERVER
    assert body["server_ips"] == [SERVER, "2001:db8::1"]
    assert body["capture"] == {"running": True, "source": "pcap:x.pcap", "error": None, "packets": 5, "dropped": 3}


def test_index_reports_capture_error(history):
    status = CaptureStatus("live", "eth0", error="permission denied")
    body = make_client(history, status).get("/").get_json()
    assert body["capture"]["error"] == "permission denied"
    assert body["capture"]["running"] is False
    assert body["capture"]["source"] == "live:eth0"


def test_index_serves_html_landing_page_to_browsers(client):
    response = client.get("/", headers={"Accept": BROWSER_ACCEPT})
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    for link in ('href="metrics"', 'href="openapi.json"', 'href="dashboard"'):
        assert link in page
    assert "Accept" in response.headers["Vary"]


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "application/json, text/html;q=0.5"])
def test_index_serves_json_to_api_clients(client, accept):
    response = client.get("/", headers={"Accept": accept} if accept else {})
    assert response.mimetype == "application/json"
    assert response.get_json()["message"] == "Backend (real capture) OK"


# --- GET /traffic --------------------------------------------------------------------------------

def test_traffic_gives_bytes_per_client_direction_and_protocol(client):
    response = client.get("/traffic")
    assert response.status_code == 200 and response.mimetype == "application/json"
    body = response.get_json()
    assert list(body) == ["window", "clients", "generated_at"]
    assert body["window"] == 4
    assert isinstance(body["generated_at"], float)
    by_ip = {entry["ip"]: entry for entry in body["clients"]}
    assert set(by_ip) == {"198.51.100.10", "198.51.100.20", "198.51.100.30"}
    web = by_ip["198.51.100.10"]
    assert list(web) == ["ip", "bytes_in", "bytes_out", "total", "protocols"]
    assert (web["bytes_in"], web["bytes_out"]) == (SIZE["http"], SIZE["https"])
    assert web["total"] == SIZE["http"] + SIZE["https"]
    assert web["protocols"] == {**dict.fromkeys(LABELS, 0), "HTTP": SIZE["http"], "HTTPS": SIZE["https"]}
    assert by_ip["198.51.100.20"]["protocols"]["DNS"] == SIZE["dns"]
    assert by_ip["198.51.100.30"]["protocols"]["SSH"] == SIZE["ssh"]
    for entry in body["clients"]:
        assert list(entry["protocols"]) == LABELS
        assert all(is_count(entry[key]) for key in ("bytes_in", "bytes_out", "total"))
        assert sum(entry["protocols"].values()) == entry["total"]


def test_traffic_sorts_by_total_descending_then_ip(tally, history):
    feed(tally, [tcp_in("198.51.100.9", 80, 10), tcp_in("198.51.100.10", 80, 10),
                 tcp_in("198.51.100.2", 80, 500), tcp_in("198.51.100.100", 80, 1)])
    history.tick(1000)
    clients = make_client(history).get("/traffic").get_json()["clients"]
    assert [c["ip"] for c in clients] == ["198.51.100.2", "198.51.100.10", "198.51.100.9", "198.51.100.100"]


def test_traffic_limit_keeps_the_biggest_clients(client):
    clients = client.get("/traffic?limit=1").get_json()["clients"]
    assert [c["ip"] for c in clients] == ["198.51.100.10"]


def test_traffic_default_limit_is_ten(tally, history):
    feed(tally, [tcp_in(f"198.51.100.{n}", 80, n) for n in range(1, 31)])
    history.tick(1000)
    client = make_client(history)
    assert len(client.get("/traffic").get_json()["clients"]) == 10
    assert len(client.get("/traffic?limit=1000").get_json()["clients"]) == 30


def test_traffic_seconds_covers_only_the_newest_seconds(client):
    body = client.get("/traffic?seconds=1").get_json()
    assert body["window"] == 1
    assert {c["ip"]: c["total"] for c in body["clients"]} == {
        "198.51.100.30": SIZE["ssh"], "198.51.100.10": SIZE["https"]}


def test_window_is_capped_by_the_seconds_available(client):
    assert client.get("/traffic?seconds=300").get_json()["window"] == 4
    assert client.get("/protocols?seconds=3").get_json()["window"] == 3


def test_empty_history_gives_empty_views(history):
    client = make_client(history)
    assert client.get("/traffic").get_json()["clients"] == []
    assert client.get("/traffic").get_json()["window"] == 0
    assert client.get("/traffic_history").get_json()["buckets"] == []


# --- GET /protocols ------------------------------------------------------------------------------

def test_protocols_lists_every_label_sorted_by_bytes(client):
    body = client.get("/protocols").get_json()
    assert list(body) == ["window", "protocols", "total_bytes", "generated_at"]
    rows = body["protocols"]
    assert sorted(row["protocol"] for row in rows) == sorted(LABELS)
    assert [row["bytes"] for row in rows] == sorted((row["bytes"] for row in rows), reverse=True)
    assert body["total_bytes"] == sum(SIZE.values())
    by_label = {row["protocol"]: row for row in rows}
    assert by_label["HTTP"] == {"protocol": "HTTP", "bytes": SIZE["http"], "bytes_in": SIZE["http"],
                                "bytes_out": 0, "packets": 1, "share": SIZE["http"] / body["total_bytes"]}
    assert by_label["HTTPS"]["bytes_out"] == SIZE["https"]
    assert by_label["FTP"] == {"protocol": "FTP", "bytes": 0, "bytes_in": 0, "bytes_out": 0, "packets": 0,
                               "share": 0}
    assert sum(row["share"] for row in rows) == pytest.approx(1.0)
    assert all(0 <= row["share"] <= 1 for row in rows)


def test_protocols_share_is_zero_without_traffic(history):
    history.tick(1000)
    body = make_client(history).get("/protocols").get_json()
    assert body["total_bytes"] == 0
    assert [row["protocol"] for row in body["protocols"]] == LABELS  # ties keep the label order
    assert all(row["share"] == 0 for row in body["protocols"])


# --- GET /traffic_history ------------------------------------------------------------------------

def test_traffic_history_is_contiguous_oldest_first_and_zero_filled(client):
    body = client.get("/traffic_history").get_json()
    assert list(body) == ["seconds", "interval", "buckets", "generated_at"]
    assert (body["seconds"], body["interval"]) == (60, 1)
    buckets = body["buckets"]
    assert [b["timestamp"] for b in buckets] == [999, 1000, 1001, 1002]
    assert [b["total"] for b in buckets] == [SIZE["http"] + SIZE["dns"], 0, 0, SIZE["ssh"] + SIZE["https"]]
    assert buckets[0] == {"timestamp": 999, "bytes_in": SIZE["http"], "bytes_out": SIZE["dns"],
                          "total": SIZE["http"] + SIZE["dns"], "packets": 2,
                          "protocols": {**dict.fromkeys(LABELS, 0), "HTTP": SIZE["http"], "DNS": SIZE["dns"]}}
    assert buckets[1]["protocols"] == dict.fromkeys(LABELS, 0)


def test_traffic_history_defaults_to_sixty_seconds():
    history = History(Tally(), 300)
    for second in range(1000, 1101):
        history.tick(second)
    client = make_client(history)
    assert len(client.get("/traffic_history").get_json()["buckets"]) == 60
    buckets = client.get("/traffic_history?seconds=300").get_json()["buckets"]
    assert len(buckets) == 101
    assert buckets[-1]["timestamp"] == 1099


# --- parameters ----------------------------------------------------------------------------------

BAD_VALUES = ["", "abc", "-1", "0", "1.5", "1e3", "0x10", " 5", "5 ", "+5", "1_0", "٣", "99999999999999999999",
              "NaN", "true", "[1]"]


@pytest.mark.parametrize("value", BAD_VALUES + ["1001"])
def test_bad_limit_is_rejected_with_400(client, value):
    response = client.get("/traffic", query_string={"limit": value})
    assert response.status_code == 400
    assert response.get_json() == {"error": "limit must be an integer from 1 to 1000"}


@pytest.mark.parametrize("path", SECONDS_ENDPOINTS)
@pytest.mark.parametrize("value", BAD_VALUES + ["301"])
def test_bad_seconds_is_rejected_with_400(client, path, value):
    response = client.get(path, query_string={"seconds": value})
    assert response.status_code == 400
    assert response.mimetype == "application/json"
    assert response.get_json() == {"error": "seconds must be an integer from 1 to 300"}


@pytest.mark.parametrize("path, param", [("/traffic", "limit")] + [(p, "seconds") for p in SECONDS_ENDPOINTS])
def test_repeated_parameter_is_rejected_with_400(client, path, param):
    response = client.get(f"{path}?{param}=5&{param}=5")
    assert response.status_code == 400
    assert param in response.get_json()["error"]


def test_parameter_bounds_are_accepted(client):
    for query in ("limit=1", "limit=1000", "seconds=1", "seconds=300", "limit=007"):
        assert client.get(f"/traffic?{query}").status_code == 200


def test_seconds_range_follows_history_length():
    client = make_client(build_history(Tally(), seconds=20))
    for path in SECONDS_ENDPOINTS:
        assert client.get(path).status_code == 200  # defaults above 20 are capped
        response = client.get(f"{path}?seconds=21")
        assert response.status_code == 400
        assert response.get_json() == {"error": "seconds must be an integer from 1 to 20"}


def test_unknown_parameters_are_ignored(client):
    response = client.get("/traffic?foo=bar&limit=2&seconds=300&callback=x")
    assert response.status_code == 200
    assert len(response.get_json()["clients"]) == 2


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(ENDPOINTS), name=st.sampled_from(["limit", "seconds", "x"]),
       values=st.lists(st.text(max_size=30), min_size=1, max_size=3))
def test_no_query_string_causes_a_server_error(client, path, name, values):
    response = client.get(path, query_string=[(name, value) for value in values])
    assert response.status_code in (200, 400)
    assert response.mimetype == "application/json"


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/nope", "/traffic/", "/metrics", "/api/traffic", "/%00"])
def test_unknown_path_is_404_json(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.mimetype == "application/json"
    assert "not found" in response.get_json()["error"]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_wrong_method_is_405_json(client, method):
    response = client.open("/traffic", method=method)
    assert response.status_code == 405
    assert response.get_json() == {"error": f"method not allowed: {method} /traffic"}
    assert "GET" in response.headers["Allow"]


def test_unexpected_error_is_500_json_and_logged(caplog):
    class BrokenHistory(History):
        def clients_window(self, seconds):
            raise RuntimeError("boom")

    client = make_client(BrokenHistory(Tally(), 10))
    with caplog.at_level(logging.ERROR, logger="compat_api.app"):
        response = client.get("/traffic")
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal server error"}
    assert any(record.exc_info and "boom" in str(record.exc_info[1]) for record in caplog.records)


# --- CORS ----------------------------------------------------------------------------------------

def test_cors_allows_any_origin_by_default(client):
    response = client.get("/traffic", headers={"Origin": "https://grafana.example"})
    assert response.headers["Access-Control-Allow-Origin"] in ("*", "https://grafana.example")


def test_cors_allows_only_configured_origins(tally):
    client = make_client(build_history(tally), cors_origins=("https://ok.example",))
    allowed = client.get("/protocols", headers={"Origin": "https://ok.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://ok.example"
    refused = client.get("/protocols", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in refused.headers


def test_cors_headers_on_error_responses(client):
    response = client.get("/traffic?limit=0", headers={"Origin": "https://grafana.example"})
    assert response.status_code == 400
    assert "Access-Control-Allow-Origin" in response.headers


@pytest.mark.parametrize("path", ENDPOINTS)
def test_cors_preflight_is_answered(client, path):
    response = client.options(path, headers={"Origin": "https://grafana.example",
                                             "Access-Control-Request-Method": "GET"})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] in ("*", "https://grafana.example")
    assert "GET" in response.headers["Access-Control-Allow-Methods"]
    assert "POST" not in response.headers["Access-Control-Allow-Methods"]


# --- OpenAPI -------------------------------------------------------------------------------------

def test_openapi_is_a_valid_document_with_the_four_paths(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    spec = response.get_json()
    validate_spec(spec)
    assert spec["openapi"].startswith("3.0")
    assert set(spec["paths"]) == set(ENDPOINTS)


def test_openapi_seconds_maximum_follows_history_length():
    spec = make_client(History(Tally(), 20)).get("/openapi.json").get_json()
    seconds = [p["schema"] for p in spec["components"]["parameters"].values() if p["name"] == "seconds"]
    assert len(seconds) == 3
    assert all(schema["maximum"] == 20 and schema["default"] <= 20 for schema in seconds)


@pytest.mark.parametrize("path, schema", [("/", "Index"), ("/traffic", "Traffic"), ("/protocols", "Protocols"),
                                          ("/traffic_history", "TrafficHistory"), ("/traffic?limit=0", "Error")])
def test_responses_match_the_openapi_schemas(client, openapi_components, path, schema):
    validator = OAS30Validator({"$ref": f"#/components/schemas/{schema}", "components": openapi_components})
    validator.validate(client.get(path).get_json())


# --- a real capture ------------------------------------------------------------------------------

def test_replayed_pcap_matches_the_oracle(tally):
    expected = expected_summary("mptcp-v0.pcap")
    source = PcapSource(str(CORPUS_PCAPS / "mptcp-v0.pcap"))
    counter = FrameCounter(ServerSet(expected["servers"]), DEFAULT_PORT_LABELS, LABELS)
    for batch in source.batches(threading.Event()):
        tally.record(counter.count(batch))
    history = History(tally, 300)
    history.tick(1000)
    client = make_client(history, servers=tuple(expected["servers"]))
    clients = {c["ip"]: c for c in client.get("/traffic").get_json()["clients"]}
    assert set(clients) == set(expected["clients"])
    for ip, want in expected["clients"].items():
        assert (clients[ip]["bytes_in"], clients[ip]["bytes_out"]) == (want["bytes_in"], want["bytes_out"])
        assert {k: v for k, v in clients[ip]["protocols"].items() if v} == want["protocols"]
    assert client.get("/protocols").get_json()["total_bytes"] == expected["total_bytes"]


# --- TCP health in /traffic ----------------------------------------------------------------------

def test_traffic_gives_each_client_its_median_handshake_rtt_and_retransmission_ratio(tmp_path):
    from tests.tcp_traffic import tcp_health_tally

    tally, truth = tcp_health_tally(tmp_path, max_clients=3)  # 10.0.0.4, seen last, goes to other
    history = History(tally, 300)
    history.tick(1000.5)
    body = make_client(history, servers=("10.0.0.1", "fd00::1")).get("/traffic?limit=10").get_json()
    found = {entry["ip"]: entry for entry in body["clients"]}
    assert set(found) == {"10.0.0.2", "10.0.0.3", "fd00::3", "other"}
    for name in ("10.0.0.2", "10.0.0.3", "fd00::3"):
        expected = truth[name]
        segments = sum(expected["segments"].values())
        assert found[name]["retransmission_ratio"] == pytest.approx(sum(expected["retransmitted"].values()) / segments)
    # one round trip per client: histogram_quantile puts the median half-way through its bucket
    assert found["10.0.0.2"]["handshake_rtt_p50_seconds"] == pytest.approx(0.0175)  # 12.3 ms: (10, 25] ms
    assert found["10.0.0.3"]["handshake_rtt_p50_seconds"] == pytest.approx(0.0375)  # 40 ms: (25, 50] ms
    assert found["fd00::3"]["handshake_rtt_p50_seconds"] == pytest.approx(0.75)  # 0.7 s: (0.5, 1] s
    assert found["other"]["handshake_rtt_p50_seconds"] is None  # 10.0.0.4: half-open, nothing measured
    assert found["other"]["retransmission_ratio"] == pytest.approx(1 / 3)


def test_traffic_entries_keep_the_legacy_shape_without_tcp_health(client):
    for entry in client.get("/traffic").get_json()["clients"]:
        assert set(entry) == {"ip", "bytes_in", "bytes_out", "total", "protocols"}


def test_tcp_health_of_a_client_evicted_within_the_second_reaches_the_history(tmp_path):
    from tests.tcp_traffic import tcp_health_tally

    now = [0.0]
    tally, truth = tcp_health_tally(tmp_path, clock=lambda: now[0])
    now[0] = 10**6  # every client idle: evicted before the history takes the second
    tally.expire()
    history = History(tally, 300)
    history.tick(1000.5)
    found = {entry["ip"]: entry for entry in
             make_client(history, servers=("10.0.0.1",)).get("/traffic").get_json()["clients"]}
    assert found["10.0.0.2"]["retransmission_ratio"] == pytest.approx(1 / 8)
    assert found["fd00::3"]["handshake_rtt_p50_seconds"] == pytest.approx(0.75)


# --- who the clients are (--geoip-db, --resolve-names) ----------------------------------------------

def facts_of(known: dict):
    return lambda client: dict(known.get(client, {}))


KNOWN = {"198.51.100.10": {"hostname": "web.example", "asn": 64496, "as_org": "Example Transit", "country": "DE"},
         "198.51.100.20": {"country": "FR"}}


def test_traffic_entries_carry_what_is_known_of_their_clients_and_only_that(tally):
    history = build_history(tally)
    body = create_app(history, lambda: CaptureStatus("pcap", "x.pcap"), lambda: (SERVER,),
                      client_facts=facts_of(KNOWN)).test_client().get("/traffic").get_json()
    by_ip = {entry["ip"]: entry for entry in body["clients"]}
    assert list(by_ip["198.51.100.10"]) == ["ip", "bytes_in", "bytes_out", "total", "protocols", "hostname", "asn",
                                            "as_org", "country"]
    assert {key: by_ip["198.51.100.10"][key] for key in KNOWN["198.51.100.10"]} == KNOWN["198.51.100.10"]
    assert list(by_ip["198.51.100.20"])[5:] == ["country"] and by_ip["198.51.100.20"]["country"] == "FR"
    assert list(by_ip["198.51.100.30"]) == ["ip", "bytes_in", "bytes_out", "total", "protocols"]  # the legacy shape
    assert by_ip["198.51.100.10"]["total"] == SIZE["http"] + SIZE["https"]  # counts unchanged


def test_traffic_with_client_facts_matches_the_openapi_schema(tally, openapi_components):
    client = create_app(build_history(tally), lambda: CaptureStatus("pcap", "x.pcap"), lambda: (SERVER,),
                        client_facts=facts_of(KNOWN)).test_client()
    validator = OAS30Validator({"$ref": "#/components/schemas/Traffic", "components": openapi_components})
    validator.validate(client.get("/traffic").get_json())
    bad = {"198.51.100.10": {"country": "Germany"}}
    wrong = create_app(build_history(Tally()), lambda: CaptureStatus("pcap", "x.pcap"), lambda: (SERVER,),
                       client_facts=facts_of(bad)).test_client().get("/traffic").get_json()
    with pytest.raises(Exception):  # the schema holds the fields to their documented shapes
        validator.validate(wrong)
