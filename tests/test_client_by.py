"""--client-by asn|country end to end through start-up and summarize: the corpus and generated captures."""
from __future__ import annotations

import json
import random

import pytest
from scapy.utils import wrpcap

from exporter.config import summarize_config
from exporter.startup import client_facts, counting, open_source
from exporter.summarize import summarize as summarize_source
from tests.builders import CORPUS_PCAPS, summarize
from tests.geoip_databases import true_record, write_database
from tests.test_grouping import random_frames

# Every address space split into nested networks; 192.0.0.0/2 and 4000::/2 (and ::/3 but the IPv4 space) are in none (AS0, unknown); no IPv6 network covers ::/96, where an IPv6 database keeps the IPv4 space.
COVER = {"0.0.0.0/1": (64512, "NL"), "128.0.0.0/2": (64513, "DE"), "131.151.0.0/16": (64514, "FR"),
         "131.151.1.0/25": (64515, "JP"), "131.151.1.128/26": (64516, None), "10.0.0.0/8": (64517, "SE"),
         "2000::/3": (64520, "US"), "8000::/1": (64521, "CA"), "fe80::/10": (64522, "BR"), "2001:db8::/32": (None, "IT"),
         "2001::/16": (64523, "AU"), "198.51.100.0/24": (None, None)}
ASN_COVER = {net: ({"autonomous_system_number": asn, "autonomous_system_organization": f"Org {asn}"} if asn else {})
             for net, (asn, _) in COVER.items()}
COUNTRY_COVER = {net: ({"country": {"iso_code": code}} if code else {}) for net, (_, code) in COVER.items()}
CORPUS_FILES = ["afs.pcap", "dns_udp.pcap", "icmpv6.pcap", "802.1ad_QinQ.pcap", "ipv6-routing-header.pcap",
                "LINKTYPE_IPV6.pcap", "LINKTYPE_RAW_ipv4.pcap", "ip6_frag_asan.pcap", "dnssec.pcap"]


@pytest.fixture(scope="module")
def cover_databases(tmp_path_factory):
    directory = tmp_path_factory.mktemp("geoip")
    return (str(write_database(directory / "asn.mmdb", ASN_COVER, "DBIP-ASN-Lite")),
            str(write_database(directory / "country.mmdb", COUNTRY_COVER, "DBIP-Country-Lite")))


def summary(path, *flags) -> dict:
    config = summarize_config([str(path), *flags])
    facts = client_facts(config)
    capturing = open_source(config)
    return summarize_source(capturing.source, *counting(config, capturing.servers, facts=facts,
                                                        idle_seconds=float("inf")))


def key_of(by: str, address: str) -> str:
    record = true_record(ASN_COVER if by == "asn" else COUNTRY_COVER, address) or {}
    if by == "asn":
        return f"AS{record.get('autonomous_system_number', 0)}"
    return record.get("country", {}).get("iso_code", "unknown")


def summed_by_key(by_ip: dict, by: str) -> dict:
    expected: dict = {}
    for client in by_ip["clients"]:
        total = expected.setdefault(key_of(by, client["ip"]), [0, 0, 0, 0, {}])
        for index, field in enumerate(("bytes_in", "bytes_out", "packets_in", "packets_out")):
            total[index] += client[field]
        for label, nbytes in client["protocols"].items():
            total[4][label] = total[4].get(label, 0) + nbytes
    return expected


def per_key(by_key: dict) -> dict:
    return {c["ip"]: [c["bytes_in"], c["bytes_out"], c["packets_in"], c["packets_out"], c["protocols"]]
            for c in by_key["clients"]}


@pytest.mark.parametrize("by", ["asn", "country"])
def test_corpus_totals_by_key_equal_the_ip_run_summed_by_the_database(cover_databases, by):
    keys = set()
    for name in CORPUS_FILES:
        by_ip = summary(CORPUS_PCAPS / name)
        by_key = summary(CORPUS_PCAPS / name, "--geoip-db", cover_databases[0], "--geoip-db", cover_databases[1],
                         "--client-by", by)
        assert per_key(by_key) == summed_by_key(by_ip, by), name
        assert (by_key["packets"], by_key["ignored"], by_key["total_bytes"]) == (
            by_ip["packets"], by_ip["ignored"], by_ip["total_bytes"]), name
        keys |= set(per_key(by_key))
    assert len(keys) >= 4  # the files reach several networks


@pytest.mark.parametrize("by", ["asn", "country"])
def test_generated_capture_by_key_through_the_command_line(tmp_path, cover_databases, by):
    pcap = tmp_path / "generated.pcap"
    frames = random_frames(random.Random(21), 4000)
    wrpcap(str(pcap), [frame.data for frame in frames], linktype=1)
    server = ["--server-ip", "100.64.0.1", "--server-ip", "fd99::1"]
    by_ip = json.loads(summarize(pcap, *server, "--format", "json").stdout)
    result = summarize(pcap, *server, "--format", "json", "--geoip-db", ",".join(cover_databases), "--client-by", by)
    assert result.returncode == 0, result.stderr
    assert per_key(json.loads(result.stdout)) == summed_by_key(by_ip, by)


def test_bad_databases_stop_start_up_with_one_line(tmp_path, cover_databases):
    missing = summarize(CORPUS_PCAPS / "afs.pcap", "--geoip-db", tmp_path / "nope.mmdb")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [
        f"traffic-exporter: --geoip-db: cannot read {tmp_path / 'nope.mmdb'}: No such file or directory"]
    garbage = tmp_path / "garbage.mmdb"
    garbage.write_bytes(b"not a database" * 100)
    corrupt = summarize(CORPUS_PCAPS / "afs.pcap", "--geoip-db", garbage)
    assert corrupt.returncode == 2 and len(corrupt.stderr.strip().splitlines()) == 1
    assert str(garbage) in corrupt.stderr
    wrong = summarize(CORPUS_PCAPS / "afs.pcap", "--geoip-db", cover_databases[1], "--client-by", "asn")
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines() == [
        "traffic-exporter: --client-by asn: none of the --geoip-db files holds asn data"]


def test_summarize_prints_what_the_databases_say_in_the_table_and_the_json(cover_databases):
    databases = ("--geoip-db", ",".join(cover_databases))
    table = summarize(CORPUS_PCAPS / "afs.pcap", *databases)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:] if line.startswith("131.")}
    assert "131.151.1.59 (AS64515 Org 64515, JP)" in rows["131.151.1.59"]
    assert "131.151.1.146 (AS64516 Org 64516)" in rows["131.151.1.146"]  # its /26 names no country
    clients = {c["ip"]: c for c in json.loads(summarize(CORPUS_PCAPS / "afs.pcap", *databases, "--format",
                                                        "json").stdout)["clients"]}
    assert {k: clients["131.151.1.59"][k] for k in ("asn", "as_org", "country")} == {
        "asn": 64515, "as_org": "Org 64515", "country": "JP"}
    assert "country" not in clients["131.151.1.146"] and "hostname" not in clients["131.151.1.146"]
    by_country = summarize(CORPUS_PCAPS / "afs.pcap", *databases, "--client-by", "country").stdout.splitlines()
    assert [line.split()[0] for line in by_country[1:3]] == ["unknown", "JP"] and "(JP)" not in by_country[2]


TCP_FIGURES = (("handshakes", None), ("segments", "in"), ("segments", "out"), ("retransmitted", "in"),
               ("retransmitted", "out"), ("resets", "in"), ("resets", "out"))


def tcp_figures(health: dict) -> list[int]:
    return [health[name] if direction is None else health[name][direction] for name, direction in TCP_FIGURES]


@pytest.mark.parametrize("by", ["asn", "country"])
@pytest.mark.parametrize("name", ["ssh.pcap", "dns_tcp.pcap", "mptcp-v0.pcap", "mptcp-v1.pcap"])
def test_tcp_health_by_key_equals_the_ip_run_summed_by_the_database(cover_databases, by, name):
    by_ip = summary(CORPUS_PCAPS / name)
    by_key = summary(CORPUS_PCAPS / name, "--geoip-db", cover_databases[0], "--geoip-db", cover_databases[1],
                     "--client-by", by)
    expected: dict = {}
    for client in by_ip["clients"]:
        total = expected.setdefault(key_of(by, client["ip"]), [0] * len(TCP_FIGURES))
        expected[key_of(by, client["ip"])] = [a + b for a, b in zip(total, tcp_figures(client["tcp"]))]
    assert {client["ip"]: tcp_figures(client["tcp"]) for client in by_key["clients"]} == expected
    assert by_key["tcp"] == by_ip["tcp"]
    assert sum(figures[0] + figures[1] for figures in expected.values()) > 0  # the file has TCP to compare
