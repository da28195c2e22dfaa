"""traffic_client_info: who each tracked client is, from the databases' and the resolver's caches."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.capture import CaptureStatus
from exporter.client_info import ClientFacts
from exporter.clients import ClientGrouping
from exporter.collector import TrafficCollector, build_registry
from exporter.geoip import ASN, COUNTRY
from exporter.grouping import AttributeGrouping
from exporter.names import NameResolver
from exporter.tally import Tally
from tests.builders import LABELS, ManualClock, batch_counts
from tests.geoip_databases import true_asn, true_country, true_org

CLIENTS = ("198.51.100.200", "203.0.113.5", "2001:db8:1::9", "100.64.9.9", "192.0.2.77")


def resolved_names(answers: dict) -> NameResolver:
    """A resolver whose answers are already in its cache (resolved synchronously through ``answers``)."""
    resolver = NameResolver(1000, resolve=answers.get)
    for address in CLIENTS:
        resolver._answer(address, answers.get(address))
    return resolver


def info_series(registry) -> dict[str, dict]:
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    return {s.labels["client"]: {k: v for k, v in s.labels.items() if k != "client"}
            for s in families["traffic_client_info"].samples if s.value == 1}


def status() -> CaptureStatus:
    return CaptureStatus("pcap", "x.pcap", running=True)


def collector_registry(tally, facts) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(TrafficCollector(tally, status, lambda: (), facts))
    return registry


def test_info_labels_come_from_the_databases_and_the_resolver(geo):
    names = {"198.51.100.200": "host.example.net", "2001:db8:1::9": "six.example.org"}
    clock = ManualClock()
    tally = Tally(labels=LABELS, clock=clock, client_idle_seconds=60)
    tally.record(batch_counts({(client, "in", "HTTP"): (100, 1) for client in CLIENTS}))
    found = info_series(collector_registry(tally, ClientFacts(ClientGrouping(), geo, resolved_names(names))))
    for client in CLIENTS:
        asn = true_asn(client)
        assert found[client] == {"hostname": names.get(client, ""), "asn": "" if asn is None else str(asn),
                                 "as_org": true_org(client) or "", "country": true_country(client) or ""}
    assert found["other"] == {"hostname": "", "asn": "", "as_org": "", "country": ""}
    clock.now += 61  # every client idle: evicted, and its info series ends with it
    tally.expire()
    assert set(info_series(collector_registry(tally, ClientFacts(ClientGrouping(), geo)))) == {"other"}


def test_networks_are_described_by_their_first_address(geo):
    tally = Tally(labels=LABELS, grouping=ClientGrouping(24, 48))
    tally.record(batch_counts({("198.51.100.77", "in", "HTTP"): (1, 1)}, grouping=ClientGrouping(24, 48)))
    found = info_series(collector_registry(tally, ClientFacts(ClientGrouping(24, 48), geo)))
    assert found["198.51.100.0/24"] == {"hostname": "", "asn": "64496", "as_org": "Example Transit", "country": "DE"}


@pytest.mark.parametrize("by", [ASN, COUNTRY])
def test_clients_by_key_are_described_by_their_key(geo, by):
    grouping = AttributeGrouping(by, geo.place)
    tally = Tally(labels=LABELS, grouping=grouping)
    tally.record(batch_counts({(client, "in", "HTTP"): (100, 1) for client in CLIENTS}, grouping=grouping))
    found = info_series(collector_registry(tally, ClientFacts(grouping, geo)))
    if by == ASN:
        assert found["AS64510"] == {"hostname": "", "asn": "64510", "as_org": "Deeper", "country": ""}
        assert found["AS64498"] == {"hostname": "", "asn": "64498", "as_org": "", "country": ""}
        assert found["AS0"] == {"hostname": "", "asn": "", "as_org": "", "country": ""}
    else:
        assert found["FR"] == {"hostname": "", "asn": "", "as_org": "", "country": "FR"}
        assert found["unknown"] == {"hostname": "", "asn": "", "as_org": "", "country": ""}
    assert set(found) - {"other"} == {grouping.name(key) for key in tally._slot_of}


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed (Debian package prometheus)")
def test_promtool_check_metrics_stays_silent_with_names_and_databases(geo):
    tally = Tally(labels=LABELS)
    tally.record(batch_counts({(client, "in", "HTTP"): (100, 1) for client in CLIENTS}))
    odd = {"198.51.100.200": 'quote"back\\slash\nnewline.example', "203.0.113.5": "x" * 300}
    text = generate_latest(build_registry(tally, status, lambda: (), ClientFacts(ClientGrouping(), geo,
                                                                                   resolved_names(odd))))
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert result.returncode == 0 and result.stdout == b"" and result.stderr == b"", result
    found = info_series(build_registry(tally, status, lambda: (), ClientFacts(ClientGrouping(), geo,
                                                                                resolved_names(odd))))
    assert found["198.51.100.200"]["hostname"] == odd["198.51.100.200"]  # shown as returned
    assert found["203.0.113.5"]["hostname"] == "x" * 253  # cut to a DNS name's length
