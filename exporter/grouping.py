"""``--client-by asn|country``: a client is the AS (``AS64496``) or the ISO country code of the other end.

The engine sums a batch per address as usual; ``regroup`` then maps each distinct address of the
batch (one row per address) to its AS or country through a bounded cache, and sums the rows per
key. So lookups happen per distinct address of a batch, never per frame, and the tally, ``other``,
eviction, exact totals and the state file work on these keys as on addresses.

A key is a synthetic (family, hi, lo): family ``FAMILY_AS`` or ``FAMILY_COUNTRY`` (never 4 or 6),
hi 0, lo the AS number or the two letters of the code as a 16-bit number. An address the
databases know nothing about goes to ``AS0`` (RFC 7607: no AS) or ``unknown``.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Callable, Optional

import numpy as np

from .clients import FAMILY_V4, BatchCounts, ClientGrouping, ClientKey
from .geoip import ASN, COUNTRY, Place

FAMILY_AS, FAMILY_COUNTRY = 65, 67  # "A", "C"
UNKNOWN_AS, UNKNOWN_COUNTRY = "AS0", "unknown"
KEY_CACHE_SIZE = 1 << 16  # addresses; a flood makes it start afresh (time, never memory)
ORGANISATIONS_SIZE = 1 << 17  # AS numbers whose organisation is remembered (about 80k are allocated)
_AS_NAME = re.compile(r"AS(0|[1-9][0-9]{0,9})")
_COUNTRY_NAME = re.compile(r"[A-Z]{2}")


class AttributeGrouping(ClientGrouping):
    """Clients keyed by AS number or country, from ``place(address)`` (``GeoDatabases.place``)."""

    def __init__(self, by: str, place: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], Place],
                 cache_size: int = KEY_CACHE_SIZE):
        super().__init__()  # addresses stay whole until regroup
        if by not in (ASN, COUNTRY):
            raise ValueError(f"cannot group clients by {by!r}")
        self.by = by
        self.place = place
        self._family = FAMILY_AS if by == ASN else FAMILY_COUNTRY
        self._cache: dict[ClientKey, int] = {}
        self._cache_size = cache_size
        self._organisations: dict[int, str] = {}

    def regroup(self, sums: BatchCounts) -> BatchCounts:
        """The batch's rows (one per address) summed per AS or country, in the order keys first appear."""
        if not len(sums.family):
            return sums
        cache = self._cache
        values = []
        for address in zip(sums.family.tolist(), sums.hi.tolist(), sums.lo.tolist()):
            value = cache.get(address)
            if value is None:
                value = self._look_up(address)
            values.append(value)
        keys, first, inverse = np.unique(np.array(values, np.uint64), return_index=True, return_inverse=True)
        order = np.argsort(first)
        rank = np.empty(len(keys), np.intp)
        rank[order] = np.arange(len(keys))
        row = rank[inverse.reshape(-1)]
        counts = np.zeros((len(keys), *sums.counts.shape[1:]), np.int64)
        np.add.at(counts, row, sums.counts)
        tcp = sums.tcp
        if tcp is not None:  # TCP health sums per address row: per key alike
            tcp = np.zeros((len(keys), sums.tcp.shape[1]), np.int64)
            np.add.at(tcp, row, sums.tcp)
        return sums._replace(family=np.full(len(keys), self._family, np.uint8), hi=np.zeros(len(keys), np.uint64),
                             lo=keys[order], counts=counts, tcp=tcp)

    def _look_up(self, address: ClientKey) -> int:
        family, hi, lo = address
        place = self.place(ipaddress.IPv4Address(lo) if family == FAMILY_V4 else ipaddress.IPv6Address(hi << 64 | lo))
        if self.by == ASN:
            value = place.asn or 0
            if value and place.as_org and len(self._organisations) < ORGANISATIONS_SIZE:
                self._organisations[value] = place.as_org
        else:
            value = ord(place.country[0]) << 8 | ord(place.country[1]) if place.country else 0
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[address] = value
        return value

    def organisation(self, asn: int) -> Optional[str]:
        """The organisation the ASN database gave for ``asn`` when one of its addresses was looked up."""
        return self._organisations.get(asn)

    def name(self, key: ClientKey) -> str:
        """``AS<number>`` or the ISO code; ``AS0``/``unknown`` when the databases did not know."""
        value = key[2]
        if self.by == ASN:
            return f"AS{value}"
        return chr(value >> 8) + chr(value & 0xFF) if value else UNKNOWN_COUNTRY

    def key(self, name: str) -> Optional[ClientKey]:
        """The client a label names, or None if this grouping never gives that label."""
        if self.by == ASN:
            found = _AS_NAME.fullmatch(name)
            if found is None or int(found.group(1)) >= 2 ** 32:
                return None
            return (FAMILY_AS, 0, int(found.group(1)))
        if name == UNKNOWN_COUNTRY:
            return (FAMILY_COUNTRY, 0, 0)
        if _COUNTRY_NAME.fullmatch(name) is None:
            return None
        return (FAMILY_COUNTRY, 0, ord(name[0]) << 8 | ord(name[1]))


def asn_of(name: str) -> Optional[int]:
    """The AS number of an ``AS<number>`` client label, else None."""
    found = _AS_NAME.fullmatch(name)
    return int(found.group(1)) if found else None
