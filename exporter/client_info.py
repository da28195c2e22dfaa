"""Who a client is: host name, AS and country, from the caches of the resolver and the databases.

Read at scrape or report time for the clients of a snapshot; nothing here queries DNS or blocks.
"""
from __future__ import annotations

import ipaddress
from typing import Iterator, Optional, Sequence

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .clients import ClientGrouping
from .geoip import NOWHERE, GeoDatabases, Place
from .grouping import AttributeGrouping, asn_of
from .names import NameResolver

FIELDS = ("hostname", "asn", "as_org", "country")


class ClientFacts:
    """What is known about clients: the grouping they are keyed by, and the optional databases and resolver."""

    def __init__(self, grouping: ClientGrouping, geo: Optional[GeoDatabases] = None,
                 names: Optional[NameResolver] = None):
        self.grouping, self.geo, self.names = grouping, geo, names

    def describe(self, client: str) -> dict[str, str]:
        """``hostname``, ``asn``, ``as_org``, ``country`` of a client label; empty strings where unknown."""
        hostname = (self.names.hostname(client) if self.names is not None else None) or ""
        if isinstance(self.grouping, AttributeGrouping):
            return self._describe_key(client, hostname)
        place = self._place(client)
        return {"hostname": hostname, "asn": "" if place.asn is None else str(place.asn),
                "as_org": place.as_org or "", "country": place.country or ""}

    def known(self, client: str) -> dict[str, object]:
        """The fields of ``describe`` that are known, ``asn`` as a number (for the REST API and summarize)."""
        return {field: int(value) if field == "asn" else value for field, value in self.describe(client).items()
                if value}

    def _place(self, client: str) -> Place:
        """The databases' answer for an address, or for a network's first address (``--client-prefix-*``)."""
        if self.geo is None:
            return NOWHERE
        try:
            address = ipaddress.ip_network(client, strict=False).network_address
        except ValueError:  # ``other``
            return NOWHERE
        return self.geo.place(address)

    def _describe_key(self, client: str, hostname: str) -> dict[str, str]:
        grouping = self.grouping
        asn = asn_of(client) if grouping.by == "asn" else None
        if asn:
            return {"hostname": hostname, "asn": str(asn), "as_org": grouping.organisation(asn) or "", "country": ""}
        country = client if grouping.by == "country" and grouping.key(client) and client != "unknown" else ""
        return {"hostname": hostname, "asn": "", "as_org": "", "country": country}


def info_families(clients: Sequence[str], facts: Optional[ClientFacts]) -> Iterator[Metric]:
    """``traffic_client_info`` for the clients of a snapshot (``other`` too, with empty labels, so joins keep it),
    and the resolver's own counters when names are resolved."""
    info = GaugeMetricFamily("traffic_client_info",
                             "Who a client is: host name (PTR), AS number and organisation, country; empty when "
                             "unknown (always 1).", labels=["client", *FIELDS])
    for client in clients:
        described = facts.describe(client) if facts is not None else dict.fromkeys(FIELDS, "")
        info.add_metric([client, *(described[field] for field in FIELDS)], 1)
    yield info
    if facts is None or facts.names is None:
        return
    stats = facts.names.stats()
    yield CounterMetricFamily("traffic_exporter_name_queries", "PTR queries made for client host names.",
                              value=stats.queries)
    yield CounterMetricFamily("traffic_exporter_name_failures",
                              "PTR queries that gave no name (no record, timeout, error).", value=stats.failures)
    yield CounterMetricFamily("traffic_exporter_name_dropped",
                              "New clients not resolved because the resolver's queue was full.", value=stats.dropped)
    yield GaugeMetricFamily("traffic_exporter_name_cache_entries", "Answers (names and failures) in the name cache.",
                            value=stats.cached)
