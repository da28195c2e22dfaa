"""ASN and country lookups from MaxMind-format databases written here with mmdb-writer."""
from __future__ import annotations

import ipaddress
import random

import maxminddb
import pytest

from exporter.geoip import ASN, COUNTRY, GeoDatabases, GeoipError, Place, database_kind
from tests.geoip_databases import (ASN_RECORDS, COUNTRY_RECORDS, true_asn, true_country, true_org,
                                   write_database, write_example_databases)


@pytest.fixture
def databases(tmp_path):
    return write_example_databases(tmp_path)


def sample_addresses(rng: random.Random, count: int) -> list[str]:
    """Addresses inside every network of the tables (the nested ones too), and outside all of them."""
    networks = [ipaddress.ip_network(n) for n in {**ASN_RECORDS, **COUNTRY_RECORDS}]
    found = []
    for _ in range(count):
        if rng.random() < 0.2:
            version = rng.choice([4, 6])
            found.append(str(ipaddress.ip_address(rng.getrandbits(32 if version == 4 else 128)) if version == 4
                             else ipaddress.IPv6Address(rng.getrandbits(128))))
            continue
        network = rng.choice(networks)
        found.append(str(network[rng.randrange(min(network.num_addresses, 2 ** 32))]))
    return found


def test_lookups_equal_the_written_ground_truth_and_maxminddbs_own_records(databases):
    geo = GeoDatabases([str(path) for path in databases])
    readers = [maxminddb.open_database(str(path)) for path in databases]
    for address in sample_addresses(random.Random(7), 3000) + ["198.51.100.193", "198.51.100.129", "2001:db8:1::5"]:
        place = geo.place(ipaddress.ip_address(address))
        assert place == Place(true_asn(address), true_org(address), true_country(address)), address
        asn_record = readers[0].get(address) or {}
        country_record = readers[1].get(address) or {}
        assert place.asn == asn_record.get("autonomous_system_number")
        assert place.as_org == asn_record.get("autonomous_system_organization")
        assert place.country == (country_record.get("country") or country_record.get("registered_country")
                                 or {}).get("iso_code")


def test_nested_prefixes_answer_with_the_most_specific_network(databases):
    geo = GeoDatabases([str(path) for path in databases])
    assert geo.place(ipaddress.ip_address("198.51.100.1")) == Place(64496, "Example Transit", "DE")
    assert geo.place(ipaddress.ip_address("198.51.100.130")) == Place(64497, "Nested Hosting", "FR")
    assert geo.place(ipaddress.ip_address("198.51.100.200")) == Place(64510, "Deeper", "FR")
    assert geo.place(ipaddress.ip_address("2001:db8:1::1")) == Place(64500, "Six Nested", "CA")
    assert geo.place(ipaddress.ip_address("2001:db8:2::1")) == Place(64499, "Six Org", "US")


def test_missing_fields_stay_unknown(databases):
    geo = GeoDatabases([str(path) for path in databases])
    assert geo.place(ipaddress.ip_address("203.0.113.9")) == Place(64498, None, "JP")  # registered country only
    assert geo.place(ipaddress.ip_address("192.0.2.9")) == Place(None, "No Number Ltd", None)
    assert geo.place(ipaddress.ip_address("100.64.0.1")) == Place()


def test_an_ipv4_only_database_knows_nothing_of_ipv6_addresses(tmp_path, databases):
    country_v4 = write_database(tmp_path / "c4.mmdb", COUNTRY_RECORDS, "DBIP-Country-Lite", ip_version=4)
    geo = GeoDatabases([str(databases[0]), str(country_v4)])
    assert geo.place(ipaddress.ip_address("2001:db8::1")) == Place(64499, "Six Org", None)
    assert geo.place(ipaddress.ip_address("10.200.0.1")) == Place(64501, "Private Ten", "BE")


@pytest.mark.parametrize("database_type, kind", [
    ("GeoLite2-ASN", ASN), ("DBIP-ASN-Lite", ASN), ("GeoLite2-Country", COUNTRY), ("GeoIP2-City", COUNTRY),
    ("DBIP-City-Lite", COUNTRY), ("GeoIP2-Anonymous-IP", None), ("GeoIP2-Domain", None)])
def test_the_kind_comes_from_the_metadata(database_type, kind):
    assert database_kind(database_type) == kind


def test_the_kind_is_read_from_the_file_not_its_name(tmp_path):
    path = write_database(tmp_path / "asn-looking-name.mmdb", COUNTRY_RECORDS, "GeoIP2-City")
    assert GeoDatabases([str(path)]).kinds == {COUNTRY}


def test_bad_databases_are_refused_with_the_file_named(tmp_path, databases):
    corrupt = tmp_path / "corrupt.mmdb"
    corrupt.write_bytes(databases[0].read_bytes()[:200])
    other_kind = write_database(tmp_path / "anon.mmdb", {"10.0.0.0/8": {"is_anonymous": True}}, "GeoIP2-Anonymous-IP")
    cases = {str(tmp_path / "missing.mmdb"): "No such file", str(corrupt): "corrupt.mmdb",
             str(tmp_path): "cannot read", str(other_kind): "GeoIP2-Anonymous-IP"}
    for path, words in cases.items():
        with pytest.raises(GeoipError) as error:
            GeoDatabases([path])
        assert words in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(GeoipError, match="second asn database"):
        GeoDatabases([str(databases[0]), str(databases[0])])


def test_the_address_cache_stays_bounded_and_right(databases):
    geo = GeoDatabases([str(path) for path in databases], cache_size=16)
    for address in sample_addresses(random.Random(3), 500):
        assert geo.place(ipaddress.ip_address(address)).asn == true_asn(address)
        assert geo.cached() <= 16
