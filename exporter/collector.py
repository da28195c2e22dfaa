"""Prometheus collector: reads the tally and the capture's health at scrape time and turns them into metric families."""
from __future__ import annotations

import platform
from importlib import metadata
from typing import Callable, Iterator, Optional, Sequence

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .capture import CaptureStatus
from .classify import DIRECTIONS
from .client_info import ClientFacts, info_families
from .tally import RESULTS, Tally


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
