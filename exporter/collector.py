"""Prometheus collector: reads the tally and the capture's health at scrape time and turns them into metric families."""
from __future__ import annotations

import platform
from importlib import metadata
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .capture import CaptureStatus
from .classify import DIRECTIONS
from .client_info import ClientFacts, info_families
from .tally import RESULTS, Tally, TallySnapshot
from .tcpflows import RTT_BUCKETS, tcp_columns


class TrafficCollector(Collector):
    """Every ``traffic_*`` metric of the exporter, built from one consistent snapshot per scrape."""

    def __init__(self, tally: Tally, capture_status: Callable[[], CaptureStatus],
                 server_addresses: Callable[[], Sequence[str]], facts: Optional[ClientFacts] = None):
        self.tally = tally
        self.facts = facts
        self.capture_status = capture_status
        self.server_addresses = server_addresses

    def collect(self) -> Iterator[Metric]:
        snapshot = self.tally.snapshot()
        status = self.capture_status()
        labels = ["client", "direction", "protocol"]
        client_bytes = CounterMetricFamily(
            "traffic_client_bytes", "Bytes on the wire (frame length) exchanged with a client.", labels=labels)
        client_packets = CounterMetricFamily(
            "traffic_client_packets", "Frames exchanged with a client.", labels=labels)
        for key, (nbytes, packets) in snapshot.series.items():
            client_bytes.add_metric(key, nbytes)
            client_packets.add_metric(key, packets)
        yield client_bytes
        yield client_packets
        yield from info_families(snapshot.clients, self.facts)

        # Every (direction, protocol) pair exists from the start at 0, so increase() misses nothing.
        total_bytes = CounterMetricFamily(
            "traffic_bytes", "Bytes on the wire (frame length) of every counted frame, all clients.",
            labels=["direction", "protocol"])
        total_packets = CounterMetricFamily(
            "traffic_packets", "Counted frames, all clients.", labels=["direction", "protocol"])
        for d, direction in enumerate(DIRECTIONS):
            for index, protocol in enumerate(snapshot.labels):
                total_bytes.add_metric([direction, protocol], int(snapshot.totals[0, d, index]))
                total_packets.add_metric([direction, protocol], int(snapshot.totals[1, d, index]))
        yield total_bytes
        yield total_packets

        frames = CounterMetricFamily(
            "traffic_exporter_packets", "Captured frames by what the exporter did with them.", labels=["result"])
        for result in RESULTS:
            frames.add_metric([result], snapshot.results.get(result, 0))
        yield frames

        if snapshot.tcp is not None:
            yield from _tcp_health(snapshot)

        yield CounterMetricFamily("traffic_exporter_kernel_dropped_packets",
                                  "Frames the kernel dropped before the exporter could read them.",
                                  value=status.kernel_dropped)
        yield GaugeMetricFamily("traffic_exporter_capture_up", "1 while the capture is running, else 0.",
                                value=1 if status.running else 0)
        yield CounterMetricFamily("traffic_exporter_capture_restarts",
                                  "Times the capture was restarted after an error.", value=status.restarts)
        yield GaugeMetricFamily("traffic_exporter_tracked_clients", "Clients that currently have their own series.",
                                value=snapshot.tracked_clients)
        yield GaugeMetricFamily("traffic_exporter_max_clients",
                                "Most clients with their own series (--max-clients); the rest count as 'other'.",
                                value=snapshot.max_clients)
        yield CounterMetricFamily("traffic_exporter_client_evictions",
                                  "Clients whose series ended after being idle (their past bytes stay in traffic_bytes_total).", value=snapshot.evictions)
        info = GaugeMetricFamily("traffic_exporter_capture_info", "What the exporter captures (always 1).",
                                 labels=["source", "interface", "filter"])
        info.add_metric([status.kind, status.name, status.filter], 1)
        yield info
        servers = GaugeMetricFamily("traffic_exporter_server_address_info",
                                    "The server addresses (or networks) traffic is counted for now (always 1).",
                                    labels=["address"])
        for address in self.server_addresses():
            servers.add_metric([address], 1)
        yield servers
        yield _build_info()


def _cumulative(buckets: np.ndarray) -> list[tuple[str, int]]:
    """Prometheus buckets (le, observations up to it) from per-bucket counts, ``+Inf`` last."""
    cumulative = np.cumsum(buckets).tolist()
    return [(repr(bound), count) for bound, count in zip(RTT_BUCKETS, cumulative)] + [("+Inf", cumulative[-1])]


def _tcp_health(snapshot: TallySnapshot) -> Iterator[Metric]:
    """The TCP health families: per client (series with activity only) and exact totals (always all)."""
    columns = tcp_columns(len(snapshot.labels))
    labels, tcp, totals = snapshot.labels, snapshot.tcp, snapshot.tcp_totals
    rtt = slice(columns.rtt_buckets, columns.rtt_sum_ns)
    handshakes = CounterMetricFamily(
        "traffic_client_tcp_handshakes", "Completed TCP three-way handshakes the client opened to the server.",
        labels=["client", "protocol"])
    rtt_family = HistogramMetricFamily(
        "traffic_client_tcp_handshake_rtt_seconds",
        "Seconds from the server's (last) SYN-ACK to the client's ACK completing the handshake, at the capture point.",
        labels=["client"])
    per_direction = [(CounterMetricFamily(f"traffic_client_tcp_{name}", text, labels=["client", "direction"]), first)
                     for name, text, first in _direction_counters(columns)]
    for client, row in zip(snapshot.clients, tcp):
        for index in np.flatnonzero(row[columns.handshakes:columns.handshakes + len(labels)]).tolist():
            handshakes.add_metric([client, labels[index]], int(row[columns.handshakes + index]))
        if row[rtt].any():
            rtt_family.add_metric([client], _cumulative(row[rtt]), int(row[columns.rtt_sum_ns]) / 1e9)
        if row[columns.segments:columns.width].any():  # a client with TCP activity has all four pairs
            for family, first in per_direction:
                for d, direction in enumerate(DIRECTIONS):
                    family.add_metric([client, direction], int(row[first + d]))
    yield handshakes
    yield rtt_family
    for family, _ in per_direction:
        yield family

    total_handshakes = CounterMetricFamily("traffic_tcp_handshakes", "Completed TCP three-way handshakes, all clients.",
                                           labels=["protocol"])
    for index, protocol in enumerate(labels):
        total_handshakes.add_metric([protocol], int(totals[columns.handshakes + index]))
    yield total_handshakes
    total_rtt = HistogramMetricFamily(
        "traffic_tcp_handshake_rtt_seconds",
        "Seconds from the server's (last) SYN-ACK to the client's ACK completing the handshake, all clients.")
    total_rtt.add_metric([], _cumulative(totals[rtt]), int(totals[columns.rtt_sum_ns]) / 1e9)
    yield total_rtt
    for name, text, first in _direction_counters(columns):
        family = CounterMetricFamily(f"traffic_tcp_{name}", text.replace("the client", "clients"), labels=["direction"])
        for d, direction in enumerate(DIRECTIONS):
            family.add_metric([direction], int(totals[first + d]))
        yield family

    flows, flow_evictions, unmeasured = snapshot.tcp_table
    yield GaugeMetricFamily("traffic_exporter_tcp_flows", "TCP connections tracked for TCP health.", value=flows)
    yield GaugeMetricFamily("traffic_exporter_max_tcp_flows",
                            "Most TCP connections tracked (--max-tcp-flows); the least recently seen makes room.",
                            value=snapshot.max_tcp_flows)
    yield CounterMetricFamily("traffic_exporter_tcp_flow_evictions",
                              "TCP connections dropped from the flow table to make room for new ones.",
                              value=flow_evictions)
    yield CounterMetricFamily("traffic_exporter_tcp_handshakes_unmeasured",
                              "TCP connections dropped from the flow table while their handshake was incomplete.",
                              value=unmeasured)


def _direction_counters(columns) -> tuple:
    """(name, HELP, first column) of the per-direction TCP health counters."""
    return (("segments", "TCP segments carrying payload from (in) or to (out) the client, keep-alives excepted.",
             columns.segments),
            ("retransmitted_segments", "TCP payload segments to or from the client whose whole sequence range "
             "was already seen in that direction of the connection.", columns.retransmitted),
            ("resets", "TCP segments with RST from (in) or to (out) the client.", columns.resets))


def _build_info() -> GaugeMetricFamily:
    build = GaugeMetricFamily("traffic_exporter_build_info", "Versions the exporter runs with (always 1).",
                              labels=["version", "python_version", "scapy_version"])
    build.add_metric([__version__, platform.python_version(), metadata.version("scapy")], 1)
    return build


def build_registry(tally: Tally, capture_status: Callable[[], CaptureStatus],
                   server_addresses: Callable[[], Sequence[str]], facts: Optional[ClientFacts] = None
                   ) -> CollectorRegistry:
    """A registry with the traffic collector and prometheus-client's process, platform and GC collectors."""
    registry = CollectorRegistry()
    registry.register(TrafficCollector(tally, capture_status, server_addresses, facts))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
