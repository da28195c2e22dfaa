"""--client-by asn|country: per-key totals equal the per-address counting summed by the database's mapping."""
from __future__ import annotations

import ipaddress
import random

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from exporter.classify import ServerSet
from exporter.clients import ClientGrouping
from exporter.geoip import ASN, COUNTRY
from exporter.grouping import FAMILY_AS, FAMILY_COUNTRY, AttributeGrouping
from exporter.tally import Tally
from tests.builders import LABELS, MACS, count_frames, frame_of
from tests.geoip_databases import ASN_RECORDS, COUNTRY_RECORDS, true_asn, true_country

SERVER_V4, SERVER_V6 = "100.64.0.1", "fd99::1"  # in no network of the databases


def client_pool(rng: random.Random) -> list[str]:
    pool = []
    for network in [*ASN_RECORDS, *COUNTRY_RECORDS, "100.80.0.0/16", "2a00::/16"]:
        network = ipaddress.ip_network(network)
        pool += [str(network[rng.randrange(min(network.num_addresses, 2 ** 32))]) for _ in range(4)]
    return pool


def random_frames(rng: random.Random, count: int) -> list:
    """Frames between the server and clients of the pool, both directions, fast-path and slow-path shapes."""
    pool = client_pool(rng)
    frames = []
    for _ in range(count):
        client = rng.choice(pool)
        v4 = ipaddress.ip_address(client).version == 4
        server = SERVER_V4 if v4 else SERVER_V6
        src, dst = (client, server) if rng.random() < 0.5 else (server, client)
        transport = rng.choice([TCP(sport=rng.randrange(1024, 65536), dport=443), UDP(sport=5353, dport=53)])
        shape = rng.random()
        if v4:
            network = IP(src=src, dst=dst, options=[IPOption_RR()] if shape < 0.2 else [])  # options: slow path
        else:
            network = IPv6(src=src, dst=dst) / (IPv6ExtHdrHopByHop() if shape < 0.2 else Raw(b""))
        link = Ether(**MACS) / Dot1Q(vlan=7) if shape > 0.8 else Ether(**MACS)
        frames.append(frame_of(link / network / transport / Raw(bytes(rng.randrange(200)))))
    return frames


def tally_of(frames, grouping) -> Tally:
    tally = Tally(max_clients=10_000, grouping=grouping, labels=LABELS)
    for start in range(0, len(frames), 500):  # several batches: keys seen again, caches reused
        tally.record(count_frames(frames[start:start + 500], ServerSet([SERVER_V4, SERVER_V6]), grouping=grouping))
    return tally


@pytest.mark.parametrize("by, truth, unknown", [(ASN, lambda a: f"AS{true_asn(a) or 0}", "AS0"),
                                                 (COUNTRY, lambda a: true_country(a) or "unknown", "unknown")])
def test_totals_per_key_equal_the_ip_run_summed_by_the_databases_mapping(geo, by, truth, unknown):
    frames = random_frames(random.Random(11), 3000)
    by_ip = tally_of(frames, ClientGrouping()).snapshot()
    grouping = AttributeGrouping(by, geo.place)
    by_key = tally_of(frames, grouping).snapshot()
    expected: dict = {}
    for (client, direction, protocol), (nbytes, packets) in by_ip.series.items():
        total = expected.setdefault((truth(client), direction, protocol), [0, 0])
        total[0] += nbytes
        total[1] += packets
    assert {key: list(value) for key, value in by_key.series.items()} == expected
    assert unknown in {client for client, _, _ in expected}  # some clients are in no network
    assert (by_key.totals == by_ip.totals).all() and by_key.results == by_ip.results


def test_keys_and_labels_convert_both_ways():
    asn = AttributeGrouping(ASN, lambda address: None)
    country = AttributeGrouping(COUNTRY, lambda address: None)
    assert asn.name((FAMILY_AS, 0, 64496)) == "AS64496" and asn.key("AS64496") == (FAMILY_AS, 0, 64496)
    assert asn.name((FAMILY_AS, 0, 0)) == "AS0" and asn.key("AS0") == (FAMILY_AS, 0, 0)
    assert asn.key("AS4294967295") == (FAMILY_AS, 0, 2 ** 32 - 1)
    for bad in ("AS4294967296", "AS064496", "as64496", "AS", "64496", "DE", "10.0.0.1", "other"):
        assert asn.key(bad) is None, bad
    assert country.name(country.key("DE")) == "DE" and country.name(country.key("unknown")) == "unknown"
    for bad in ("de", "DEU", "AS1", "D", "10.0.0.1", "other", "ÄÖ"):
        assert country.key(bad) is None, bad
    assert country.key("DE")[0] == FAMILY_COUNTRY


def test_a_state_saved_by_key_is_restored_by_key(geo):
    frames = random_frames(random.Random(5), 600)
    grouping = AttributeGrouping(ASN, geo.place)
    saved = tally_of(frames, grouping)
    restored = Tally(max_clients=10_000, grouping=AttributeGrouping(ASN, geo.place), labels=LABELS)
    restored.prepare_restore(saved.export_state())()
    assert restored.snapshot().series == saved.snapshot().series


def test_the_address_cache_is_bounded_and_answers_stay_right(geo):
    grouping = AttributeGrouping(ASN, geo.place, cache_size=8)
    frames = random_frames(random.Random(9), 1000)
    snapshot = tally_of(frames, grouping).snapshot()
    assert len(grouping._cache) <= 8
    assert snapshot.series == tally_of(frames, AttributeGrouping(ASN, geo.place)).snapshot().series


def test_the_organisation_of_an_as_is_remembered_from_its_addresses(geo):
    grouping = AttributeGrouping(ASN, geo.place)
    tally_of(random_frames(random.Random(2), 500), grouping)
    assert grouping.organisation(64496) == "Example Transit"
    assert grouping.organisation(64498) is None  # the database names no organisation


def test_a_state_saved_by_address_restores_its_totals_but_not_its_clients_by_key(geo):
    frames = random_frames(random.Random(8), 300)
    by_ip = tally_of(frames, ClientGrouping())
    restored = Tally(max_clients=10_000, grouping=AttributeGrouping(ASN, geo.place), labels=LABELS)
    restored.prepare_restore(by_ip.export_state())()
    snapshot = restored.snapshot()
    assert snapshot.tracked_clients == 0 and (snapshot.totals == by_ip.snapshot().totals).all()
    by_key = tally_of(frames, AttributeGrouping(ASN, geo.place)).export_state()
    with pytest.raises(ValueError, match="bad client"):  # AS labels mean nothing to a tally of addresses
        Tally(labels=LABELS).prepare_restore(by_key)
