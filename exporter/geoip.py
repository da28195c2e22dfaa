"""ASN and country of an address from local MaxMind-format databases (``--geoip-db``); no network access.

Each database's kind comes from its metadata's ``database_type``: one naming ``ASN`` (GeoLite2-ASN,
DBIP-ASN-Lite) gives the AS number and organisation, one naming ``Country`` or ``City`` (GeoLite2,
GeoIP2, DB-IP) the ISO country code. Lookups are cached per address in a bounded cache, and are
made per distinct address of a batch or per client at a scrape, never per frame.
"""
from __future__ import annotations

import ipaddress
import threading
from typing import NamedTuple, Optional, Sequence

ASN, COUNTRY = "asn", "country"
ADDRESS_CACHE_SIZE = 1 << 16  # a flood of new addresses makes the cache start afresh: time, never memory
MAX_ORG_LENGTH = 256  # the database is the operator's, but its strings still end up in labels


class GeoipError(Exception):
    """A database that cannot be used; the message names the file."""


class Place(NamedTuple):
    """What the databases say about an address; None where they say nothing."""

    asn: Optional[int] = None
    as_org: Optional[str] = None
    country: Optional[str] = None


NOWHERE = Place()


def database_kind(database_type: str) -> Optional[str]:
    """``asn`` or ``country`` for a metadata ``database_type``, None for other kinds."""
    lowered = database_type.lower()
    if "asn" in lowered:
        return ASN
    if "country" in lowered or "city" in lowered:
        return COUNTRY
    return None


class GeoDatabases:
    """The opened ``--geoip-db`` files (at most one per kind) and a bounded per-address cache of their answers."""

    def __init__(self, paths: Sequence[str], cache_size: int = ADDRESS_CACHE_SIZE):
        import maxminddb  # only when a database is given

        self._readers: dict[str, object] = {}
        self.paths: dict[str, str] = {}
        for path in paths:
            try:
                reader = maxminddb.open_database(path)
                database_type = str(reader.metadata().database_type)
            except (OSError, ValueError, maxminddb.InvalidDatabaseError) as error:
                raise GeoipError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
            kind = database_kind(database_type)
            if kind is None:
                raise GeoipError(f"{path} is a {database_type!r} database; expected an ASN, Country or City one")
            if kind in self._readers:
                raise GeoipError(f"{path} is a second {kind} database (after {self.paths[kind]}); give one of each")
            self._readers[kind], self.paths[kind] = reader, path
        self._invalid = maxminddb.InvalidDatabaseError
        self._cache: dict[int, Place] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the capture thread and scrapes look up at the same time

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self._readers)

    def place(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Place:
        """What the databases say about ``address`` (cached)."""
        cache_key = int(address) if address.version == 6 else -1 - int(address)
        found = self._cache.get(cache_key)
        if found is not None:
            return found
        with self._lock:
            asn = as_org = None
            record = self._record(ASN, address)
            if isinstance(record, dict):
                asn, as_org = _asn(record.get("autonomous_system_number")), _org(
                    record.get("autonomous_system_organization"))
            country = _country(self._record(COUNTRY, address))
            found = Place(asn, as_org, country) if asn is not None or country is not None or as_org else NOWHERE
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[cache_key] = found
        return found

    def _record(self, kind: str, address) -> object:
        reader = self._readers.get(kind)
        if reader is None:
            return None
        try:
            return reader.get(address)
        except (ValueError, self._invalid):  # an IPv6 address in an IPv4 database, a damaged record
            return None

    def cached(self) -> int:
        return len(self._cache)


def _asn(value: object) -> Optional[int]:
    return value if type(value) is int and 0 <= value < 2 ** 32 else None


def _org(value: object) -> Optional[str]:
    return value[:MAX_ORG_LENGTH] if isinstance(value, str) and value else None


def _country(record: object) -> Optional[str]:
    """The ISO code of ``country``, else of ``registered_country`` (GeoLite2 leaves ``country`` out for some networks)."""
    if not isinstance(record, dict):
        return None
    for field in ("country", "registered_country"):
        entry = record.get(field)
        code = entry.get("iso_code") if isinstance(entry, dict) else None
        if isinstance(code, str) and len(code) == 2 and code.isascii() and code.isalpha():
            return code.upper()
    return None
