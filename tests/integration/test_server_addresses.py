"""Without --server-ip, the server addresses follow the capture interface as addresses come and go."""
from __future__ import annotations

import sys

import pytest

from testkit.live_traffic import NamespacedExporter
from testkit.netns import namespace_pair, netns_unavailable_reason

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(netns_unavailable_reason() is not None, reason=netns_unavailable_reason() or "")]


def send_udp(pair, address: str, count: int) -> None:
    """``count`` datagrams of 100 bytes from the client to port 53 of ``address`` (IPv4 or IPv6)."""
    family = "AF_INET6" if ":" in address else "AF_INET"
    pair.client(sys.executable, "-c", "import socket\n"
                f"s = socket.socket(socket.{family}, socket.SOCK_DGRAM)\n"
                f"for _ in range({count}): s.sendto(b'x' * 100, ('{address}', 53))\n")


def dns_packets_in(exporter: NamespacedExporter, client: str) -> int:
    return exporter.client_series().get((client, "in", "DNS"), (0, 0))[1]


def not_server(exporter: NamespacedExporter) -> float:
    return exporter.metrics().get(("traffic_exporter_packets_total", (("result", "not_server"),)), 0)


def server_addresses(exporter: NamespacedExporter) -> set[str]:
    return {dict(labels)["address"] for name, labels in exporter.metrics() if name == "traffic_exporter_server_address_info"}


def test_added_addresses_count_from_the_change_on_and_removed_ones_become_not_server():
    with namespace_pair() as pair:
        new_v4, new_v6 = f"10.199.{pair.subnet}.11", f"fd00:199:{pair.subnet:x}::11"
        for address in (new_v4, new_v6):  # the client sends to them over the link before they exist
            pair.client("ip", "neigh", "replace", address, "lladdr", pair.server_mac, "dev", pair.client_link,
                        "nud", "permanent")
        exporter = NamespacedExporter(pair, ["--interface", pair.server_link, "--log-level", "info"])
        try:
            exporter.wait_ready()
            assert server_addresses(exporter) == {pair.server_v4, pair.server_v6}

            before = not_server(exporter)
            send_udp(pair, new_v4, 3)
            send_udp(pair, new_v6, 3)
            exporter.wait_until(lambda: not_server(exporter) >= before + 6, 10, "frames to unknown addresses")
            assert dns_packets_in(exporter, pair.client_v4) == dns_packets_in(exporter, pair.client_v6) == 0

            pair.server("ip", "addr", "add", f"{new_v4}/24", "dev", pair.server_link)
            pair.server("ip", "addr", "add", f"{new_v6}/64", "dev", pair.server_link, "nodad")
            exporter.wait_until(lambda: server_addresses(exporter) == {pair.server_v4, pair.server_v6, new_v4, new_v6},
                                10, "the added addresses")
            assert set(exporter.root()["server_ips"]) == {pair.server_v4, pair.server_v6, new_v4, new_v6}
            send_udp(pair, new_v4, 3)
            send_udp(pair, new_v6, 3)
            exporter.wait_until(lambda: (dns_packets_in(exporter, pair.client_v4), dns_packets_in(exporter, pair.client_v6))
                                == (3, 3), 10, "frames to the added addresses counted")

            pair.server("ip", "addr", "del", f"{pair.server_v4}/24", "dev", pair.server_link)
            exporter.wait_until(lambda: pair.server_v4 not in server_addresses(exporter), 10, "the removed address")
            before = not_server(exporter)
            send_udp(pair, pair.server_v4, 3)
            exporter.wait_until(lambda: not_server(exporter) >= before + 3, 10, "frames to the removed address")
            exporter.wait_quiet()
            assert dns_packets_in(exporter, pair.client_v4) == 3  # nothing more counted in
        finally:
            log = exporter.stop()
        assert f"server addresses of {pair.server_link} changed: added {new_v4}" in log
