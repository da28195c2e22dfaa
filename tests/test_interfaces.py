"""Interfaces, their server addresses, and the one holding the default route (from Scapy's routing tables)."""
from __future__ import annotations

import pytest

from exporter import interfaces
from exporter.frames import SourceError
from exporter.interfaces import ARPHRD_ETHER, ARPHRD_LOOPBACK, ARPHRD_NONE, Interface, default_route_interface

# Scapy's conf.route.routes: (net, mask, gateway, interface, source, metric); conf.route6.routes:
# (prefix, length, next hop, interface, sources, metric)
ROUTES = [
    (0xC0A80000, 0xFFFFFF00, "0.0.0.0", "eth1", "192.168.0.2", 0),
    (0, 0, "192.168.0.1", "wlan0", "192.168.0.3", 600),
    (0, 0, "192.0.2.1", "eth0", "192.0.2.10", 100),
    (0, 0, "0.0.0.0", "", "0.0.0.0", 0),  # unreachable default: no interface
]
ROUTES6 = [
    ("fd00::", 64, "::", "eth0", ["fd00::10"], 256),
    ("::", 0, "::", "lo", ["::1"], 0),  # a reject route through the loopback
    ("::", 0, "fe80::1", "wg0", ["fd00::8"], 1024),
]


def test_default_route_interface_picks_the_lowest_metric_ipv4_default_route_with_an_interface():
    assert default_route_interface(ROUTES, ROUTES6) == "eth0"


def test_default_route_interface_falls_back_to_ipv6_skipping_the_loopback():
    assert default_route_interface(ROUTES[:1] + ROUTES[3:], ROUTES6) == "wg0"


def test_default_route_interface_is_none_without_any_default_route():
    assert default_route_interface(ROUTES[:1], ROUTES6[:2]) is None
    assert default_route_interface([], []) is None


def fake_interfaces(monkeypatch):
    from exporter import ring

    found = {
        "lo": Interface("lo", 1, ARPHRD_LOOPBACK, True, ("127.0.0.1", "::1")),
        "eth0": Interface("eth0", 2, ARPHRD_ETHER, True, ("192.0.2.10", "192.0.2.11", "2001:db8::10", "fe80::1", "fd00::10")),
        "wg0": Interface("wg0", 3, ARPHRD_NONE, True, ("10.8.0.1", "fe80::2")),
    }
    monkeypatch.setattr(interfaces, "list_interfaces", lambda: found)
    monkeypatch.setattr(ring, "list_interfaces", lambda: found)
    return ring


def test_server_addresses_are_ipv4_and_global_ipv6_of_the_interface_without_link_local(monkeypatch):
    fake_interfaces(monkeypatch)
    assert interfaces.server_addresses("eth0") == ("192.0.2.10", "192.0.2.11", "2001:db8::10", "fd00::10")
    assert interfaces.server_addresses("wg0") == ("10.8.0.1",)


def test_server_addresses_for_any_cover_every_interface_but_loopback(monkeypatch):
    fake_interfaces(monkeypatch)
    assert interfaces.server_addresses("any") == ("192.0.2.10", "192.0.2.11", "2001:db8::10", "fd00::10", "10.8.0.1")


def test_a_missing_interface_is_a_source_error_naming_the_ones_that_exist(monkeypatch):
    ring = fake_interfaces(monkeypatch)
    with pytest.raises(SourceError, match=r"no interface named 'eth9' \(available: eth0, lo, wg0, any\)"):
        ring.LiveSource("eth9", ring_bytes=4 << 20)
    with pytest.raises(interfaces.InterfaceNotFound):
        interfaces.server_addresses("eth9")
