"""MaxMind-format databases written in the tests (mmdb-writer), and their ground truth by longest-prefix match."""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Mapping, Optional

# network -> record, as the writer stores it. Nested prefixes, both families, missing fields.
ASN_RECORDS: dict[str, dict] = {
    "198.51.100.0/24": {"autonomous_system_number": 64496, "autonomous_system_organization": "Example Transit"},
    "198.51.100.128/25": {"autonomous_system_number": 64497, "autonomous_system_organization": "Nested Hosting"},
    "198.51.100.192/28": {"autonomous_system_number": 64510, "autonomous_system_organization": "Deeper"},
    "203.0.113.0/24": {"autonomous_system_number": 64498},  # no organisation
    "192.0.2.0/24": {"autonomous_system_organization": "No Number Ltd"},  # no number
    "10.0.0.0/8": {"autonomous_system_number": 64501, "autonomous_system_organization": "Private Ten"},
    "2001:db8::/32": {"autonomous_system_number": 64499, "autonomous_system_organization": "Six Org"},
    "2001:db8:1::/48": {"autonomous_system_number": 64500, "autonomous_system_organization": "Six Nested"},
    "fd00::/8": {"autonomous_system_number": 64502, "autonomous_system_organization": "ULA Org"},
}
COUNTRY_RECORDS: dict[str, dict] = {
    "198.51.100.0/24": {"country": {"iso_code": "DE"}, "registered_country": {"iso_code": "DE"}},
    "198.51.100.128/25": {"country": {"iso_code": "FR"}},
    "203.0.113.0/24": {"registered_country": {"iso_code": "JP"}},  # no country: the registered one counts
    "192.0.2.0/24": {"continent": {"code": "EU"}},  # neither
    "10.0.0.0/9": {"country": {"iso_code": "NL"}},
    "10.128.0.0/9": {"country": {"iso_code": "BE"}},
    "2001:db8::/32": {"country": {"iso_code": "US"}},
    "2001:db8:1::/48": {"country": {"iso_code": "CA"}},
    "fd00::/8": {"country": {"iso_code": "CH"}},
}


def write_database(path: Path, records: Mapping[str, dict], database_type: str, ip_version: int = 6) -> Path:
    """Write ``records`` (broadest networks first, so nested ones override them) as an MMDB file."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=ip_version, ipv4_compatible=ip_version == 6, database_type=database_type)
    for network in sorted(records, key=lambda n: ipaddress.ip_network(n).prefixlen):
        if ip_version == 4 and ipaddress.ip_network(network).version == 6:
            continue
        writer.insert_network(IPSet([network]), records[network])
    writer.to_db_file(str(path))
    return path


def write_example_databases(directory: Path) -> tuple[Path, Path]:
    """The GeoLite2-style ASN and country databases of ASN_RECORDS and COUNTRY_RECORDS, in ``directory``."""
    return (write_database(directory / "asn.mmdb", ASN_RECORDS, "GeoLite2-ASN"),
            write_database(directory / "country.mmdb", COUNTRY_RECORDS, "GeoLite2-Country"))


def true_record(records: Mapping[str, dict], address: str) -> Optional[dict]:
    """The record of the longest network holding ``address`` (the ground truth the test wrote)."""
    ip = ipaddress.ip_address(address)
    holding = [ipaddress.ip_network(n) for n in records if ip in ipaddress.ip_network(n)]
    if not holding:
        return None
    return records[str(max(holding, key=lambda n: n.prefixlen))]


def true_asn(address: str) -> Optional[int]:
    return (true_record(ASN_RECORDS, address) or {}).get("autonomous_system_number")


def true_org(address: str) -> Optional[str]:
    return (true_record(ASN_RECORDS, address) or {}).get("autonomous_system_organization")


def true_country(address: str) -> Optional[str]:
    record = true_record(COUNTRY_RECORDS, address) or {}
    return (record.get("country") or record.get("registered_country") or {}).get("iso_code")
