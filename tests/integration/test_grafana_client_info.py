"""The Grafana panels that join traffic_client_info, evaluated by a real Prometheus against an exporter with databases.

The by-country and by-AS panels must equal the per-client rates summed by the database's mapping
(the ground truth the test wrote), and the top-clients table must carry each client's AS and country.
"""
from __future__ import annotations

import json
import time
import urllib.parse

import pytest

from bench.generate import SERVER_V4, SERVER_V6
from testkit.process import get, running_exporter
from tests.dashboard_queries import substitute_variables
from tests.geoip_databases import true_record, write_database
from tests.integration.test_prometheus_dashboard import (DASHBOARD, PCAP_CLIENTS, scraping_prometheus,
                                                         write_replay_pcap)

pytestmark = pytest.mark.integration

ASNS = {"10.99.0.0/16": {"autonomous_system_number": 64501, "autonomous_system_organization": "Bench"},
        "10.99.1.0/28": {"autonomous_system_number": 64502, "autonomous_system_organization": "Small"},
        "fd00::/8": {"autonomous_system_number": 64503}}
COUNTRIES = {"10.99.0.0/16": {"country": {"iso_code": "DE"}}, "10.99.1.16/28": {"country": {"iso_code": "FR"}}}
PANELS = ("Bytes/s by country (top 10)", "Bytes/s by AS (top 10)", "Top 20 clients now (5m rate)")


def query(prometheus_url: str, expr: str, at: float) -> list[dict]:
    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': expr, 'time': at})}"
    answer = json.loads(get(url))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def panel_exprs() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return {panel["title"]: substitute_variables(panel["targets"][0]["expr"])
            for panel in dashboard["panels"] if panel.get("title") in PANELS}


def test_country_and_as_panels_equal_client_rates_summed_by_the_database(tmp_path):
    pcap = tmp_path / "traffic.pcap"
    write_replay_pcap(pcap)  # the dashboard test's replay: every recording rule, TCP health's too, gets data
    dbs = f"{write_database(tmp_path / 'asn.mmdb', ASNS, 'GeoLite2-ASN')}," \
          f"{write_database(tmp_path / 'country.mmdb', COUNTRIES, 'GeoLite2-Country')}"
    args = ["--pcap", str(pcap), "--server-ip", SERVER_V4, "--server-ip", SERVER_V6, "--loop",
            "--replay-speed", "realtime", "--log-level", "warning", "--geoip-db", dbs]
    exprs = panel_exprs()
    assert set(exprs) == set(PANELS)
    with running_exporter(args) as (exporter_url, _exporter):
        with scraping_prometheus(tmp_path, exporter_url) as prometheus_url:
            deadline = time.monotonic() + 15
            while True:  # one instant at which the rule has been evaluated for every client
                at = time.time()
                per_client = {s["metric"]["client"]: float(s["value"][1]) for s in query(
                    prometheus_url, 'sum by (client) (client_direction:traffic_client_bytes:rate5m{instance=~".*"})',
                    at)}
                if len(per_client) > PCAP_CLIENTS // 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            panels = {title: query(prometheus_url, expr, at) for title, expr in exprs.items()}
    assert len(per_client) > PCAP_CLIENTS // 2
    by_country: dict[str, float] = {}
    by_as: dict[tuple[str, str], float] = {}
    for client, rate in per_client.items():
        country = (true_record(COUNTRIES, client) or {}).get("country", {}).get("iso_code", "")
        record = true_record(ASNS, client) or {}
        key = (str(record.get("autonomous_system_number", "")), record.get("autonomous_system_organization", ""))
        by_country[country] = by_country.get(country, 0.0) + rate
        by_as[key] = by_as.get(key, 0.0) + rate
    shown_country = {s["metric"].get("country", ""): float(s["value"][1]) for s in panels[PANELS[0]]}
    shown_as = {(s["metric"].get("asn", ""), s["metric"].get("as_org", "")): float(s["value"][1])
                for s in panels[PANELS[1]]}
    assert shown_country.keys() == by_country.keys() and shown_as.keys() == by_as.keys()
    for shown, expected in ((shown_country, by_country), (shown_as, by_as)):
        for key, value in expected.items():
            assert shown[key] == pytest.approx(value, rel=1e-9), key
    table = {s["metric"]["client"]: s["metric"] for s in panels[PANELS[2]]}
    assert len(table) == len(panels[PANELS[2]]) == min(20, len(per_client))  # one row per client
    for client, labels in table.items():
        record = true_record(ASNS, client) or {}
        assert labels.get("asn", "") == str(record.get("autonomous_system_number", "")), client
        assert labels.get("country", "") == (true_record(COUNTRIES, client) or {}).get("country", {}).get(
            "iso_code", ""), client
