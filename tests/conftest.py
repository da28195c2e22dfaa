"""Shared test setup: a guard against Scapy touching the network, and fixtures used by several test files.

Scapy fills in a missing destination MAC address by asking the network (ARP, IPv6 neighbour
discovery) for the route's next hop, which would put frames on the machine's real network. Tests
build frames with explicit addresses; a test that forgets fails here instead of sending anything.

Constants and helpers that tests import live in ``tests/builders.py`` (pytest discourages importing
a conftest).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest
import scapy.layers.inet
import scapy.layers.inet6
from scapy.utils import wrpcap

from compat_api.history import History
from exporter.tally import Tally


def _refuse_to_resolve(*_args, **_kwargs):
    raise AssertionError("Scapy was about to resolve a MAC address on the network: give Ether() src and dst")


scapy.layers.inet.getmacbyip = _refuse_to_resolve
scapy.layers.inet6.getmacbyip6 = _refuse_to_resolve


@pytest.fixture
def tally() -> Tally:
    """A fresh tally with the default bounds."""
    return Tally()


@pytest.fixture
def history(tally: Tally) -> Iterator[History]:
    """Ten seconds of history fed by ``tally``; its ticker thread, if a test starts it, is stopped after."""
    history = History(tally, 10)
    yield history
    history.stop()


@pytest.fixture
def geo(tmp_path: Path):
    """The example ASN and country databases (``tests/geoip_databases.py``), opened."""
    from exporter.geoip import GeoDatabases
    from tests.geoip_databases import write_example_databases

    return GeoDatabases([str(path) for path in write_example_databases(tmp_path)])


@pytest.fixture
def write_pcap(tmp_path: Path) -> Callable[[str, list], Path]:
    """Write Scapy packets as a classic pcap (Scapy's writer) named ``name`` in the test's directory."""
    def write(name: str, packets: list) -> Path:
        path = tmp_path / name
        wrpcap(str(path), packets)
        return path
    return write
