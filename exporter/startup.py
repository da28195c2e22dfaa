"""What start-up resolves from the configuration: the frame source, the server addresses, the counting.

Problems an operator can fix (an unknown interface, an invalid filter, no capture privilege) become
``ConfigError``: one line, exit code 2. Live capture's modules (and Scapy) are imported only for it.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional

from .bpf import FilterError
from .classify import DEFAULT_PORT_LABELS, ServerSet, protocol_labels
from .config import Config, ConfigError
from .client_info import ClientFacts
from .clients import ClientGrouping
from .engine import FrameCounter
from .frames import Source
from .replay import PcapSource
from .summarize import most_frequent_address
from .tally import Tally
from .tcpflows import FlowTable

log = logging.getLogger("exporter")


class Capturing(NamedTuple):
    """The resolved facts of a run: where frames come from, and the server they are counted for."""

    source: Source
    servers: ServerSet
    follow: Optional[str] = None  # the interface whose addresses the servers are (they may change)


def open_source(config: Config) -> Capturing:
    """Open the replay or the live capture, and settle the server addresses."""
    if config.pcap:
        try:
            source = PcapSource(config.pcap, realtime=config.replay_speed == "realtime", loop=config.loop,
                                capture_filter=config.filter, timestamps=config.tcp_health)
        except FilterError as error:
            raise ConfigError(f"--filter: {error}") from None
        return Capturing(source, _servers_of_file(config, source))
    return _open_live(config)


def counting(config: Config, servers: ServerSet, *, idle_seconds: Optional[float] = None,
             facts: Optional[ClientFacts] = None) -> tuple[FrameCounter, Tally]:
    """The counting engine and the tally it feeds (the tally tells ``facts``' resolver of new clients)."""
    grouping = facts.grouping if facts else ClientGrouping(config.client_prefix_v4, config.client_prefix_v6)
    labels = protocol_labels(DEFAULT_PORT_LABELS)
    flows = FlowTable(config.max_tcp_flows) if config.tcp_health else None
    counter = FrameCounter(servers, DEFAULT_PORT_LABELS, labels, grouping, tcp_flows=flows)
    tally = Tally(max_clients=config.max_clients, grouping=grouping, labels=labels,
                  client_idle_seconds=config.client_idle_seconds if idle_seconds is None else idle_seconds,
                  max_tcp_flows=config.max_tcp_flows if config.tcp_health else None,
                  on_admit=facts.names.submit if facts and facts.names else None)
    return counter, tally


def client_facts(config: Config) -> ClientFacts:
    """Open ``--geoip-db`` (one line on failure), choose the grouping, prepare the resolver (not started)."""
    geo = None
    if config.geoip_dbs:
        from .geoip import GeoDatabases, GeoipError

        try:
            geo = GeoDatabases(config.geoip_dbs)
        except GeoipError as error:
            raise ConfigError(f"--geoip-db: {error}") from None
    if config.client_by == "ip":
        grouping = ClientGrouping(config.client_prefix_v4, config.client_prefix_v6)
    else:
        from .grouping import AttributeGrouping

        if geo is None or config.client_by not in geo.kinds:
            raise ConfigError(f"--client-by {config.client_by}: none of the --geoip-db files holds "
                              f"{config.client_by} data")
        grouping = AttributeGrouping(config.client_by, geo.place)
    names = None
    if config.resolve_names:
        from .names import NameResolver

        names = NameResolver(config.resolve_rate)
    return ClientFacts(grouping, geo, names)


def _servers_of_file(config: Config, source: PcapSource) -> ServerSet:
    if config.server_ips:
        return ServerSet(config.server_ips)
    guessed = most_frequent_address(source)
    if guessed is None:
        log.warning("%s has no readable IP frame to guess the server from; every frame will be ignored",
                    source.name)
        return ServerSet([])
    log.info("no --server-ip given: using %s, the address seen most often in %s", guessed, source.name)
    return ServerSet([guessed])


def _open_live(config: Config) -> Capturing:
    from .interfaces import InterfaceNotFound, default_interface, server_addresses
    from .privileges import CapturePermissionError
    from .ring import FanoutError

    try:
        interface = config.interface or default_interface()
        source = _live_source(config, interface)
    except InterfaceNotFound as error:
        raise ConfigError(f"--interface: {error}") from None
    except FilterError as error:
        raise ConfigError(f"--filter: {error}") from None
    except FanoutError as error:
        raise ConfigError(f"--fanout-group: {error}") from None
    except CapturePermissionError as error:
        raise ConfigError(str(error)) from None
    servers = ServerSet(config.server_ips or server_addresses(interface))
    if not servers:
        raise ConfigError(f"--server-ip: {interface} has no IPv4 or global IPv6 address to count traffic for; "
                          f"give --server-ip")
    log.info("live capture on %s%s through %s, server addresses %s%s", interface,
             "" if config.interface else " (holds the default route)", config.live_backend(),
             ", ".join(servers.addresses),
             "" if config.server_ips else f" (those of {interface})")
    return Capturing(source, servers, None if config.server_ips else interface)


def _live_source(config: Config, interface: str) -> Source:
    """The TPACKET_V3 ring (Linux) or libpcap, as ``--capture-backend`` says."""
    if config.live_backend() == "libpcap":
        from .libpcap import LibpcapSource

        return LibpcapSource(interface, config.filter, buffer_bytes=config.capture_buffer_mib << 20,
                             timestamps=config.tcp_health)
    from .ring import LiveSource

    return LiveSource(interface, config.filter, ring_bytes=config.capture_buffer_mib << 20,
                      fanout_group=config.fanout_group, timestamps=config.tcp_health)
