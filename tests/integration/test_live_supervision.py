"""Supervision of live capture: the interface disappears under a running exporter, then comes back."""
from __future__ import annotations

import sys

import pytest

from testkit.live_traffic import REPO_ROOT, NamespacedExporter, dns_in_bytes, send_udp
from testkit.netns import namespace_pair, netns_unavailable_reason

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(netns_unavailable_reason() is not None,
                                 reason=netns_unavailable_reason() or "")]


def test_live_capture_survives_interface_loss_and_restarts_when_it_returns():
    with namespace_pair() as pair:
        exporter = NamespacedExporter(pair, ["--interface", pair.server_link])
        try:
            exporter.wait_ready()
            send_udp(pair)
            exporter.wait_quiet()
            before = dns_in_bytes(exporter, pair)
            assert before == 5 * (14 + 20 + 8 + 200)

            pair.delete_link()
            exporter.wait_until(lambda: exporter.value("traffic_exporter_capture_up") == 0, 10, "capture_up 0")
            status = exporter.wait_until(lambda: exporter.root().get("capture", {}).get("error"), 10,
                                         "an error in /")
            assert pair.server_link in status
            root = exporter.root()
            assert root["capture"]["running"] is False
            assert exporter.process.poll() is None, "the exporter must keep running without its interface"
            assert dns_in_bytes(exporter, pair) == before, "counters survive the loss"

            pair.create_link()  # same name, new ifindex
            exporter.wait_until(lambda: exporter.value("traffic_exporter_capture_up") == 1, 40,
                                "capture_up 1 after the interface came back")
            assert exporter.value("traffic_exporter_capture_restarts_total") >= 1
            assert exporter.root()["capture"]["error"] is None
            send_udp(pair)
            exporter.wait_quiet()
            assert dns_in_bytes(exporter, pair) == 2 * before  # the same datagrams again, each counted once
        finally:
            log = exporter.stop()
    assert "interface went down or was removed" in log


KERNEL_DROPS_SCRIPT = r"""
import socket, subprocess, sys
sys.path.insert(0, sys.argv.pop(1))
from exporter.ring import LiveSource

def flood():
    # 300 datagrams from the client while nobody reads: a one-block 4 KiB ring overflows.
    subprocess.run(sys.argv[1:], check=True, timeout=30)

source = LiveSource("te-srv0", ring_bytes=4096)
flood()
first = source.kernel_dropped()
again = source.kernel_dropped()  # the kernel resets its counter when read: the source accumulates
source.close()
source.open()
flood()
print(first, again, source.kernel_dropped())
source.close()
"""


def test_live_kernel_drops_are_reported_and_cumulative_across_reads_and_reopening():
    with namespace_pair() as pair:
        flood = pair.client_command(
            sys.executable, "-c",
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for _ in range(300): s.sendto(b'x' * 1000, ('{pair.server_v4}', 9))\n")
        result = pair.server(sys.executable, "-c", KERNEL_DROPS_SCRIPT, str(REPO_ROOT), *flood, timeout=60)
    first, again, after_reopen = (int(value) for value in result.stdout.split())
    assert first > 0
    assert again == first
    assert after_reopen > first


def test_live_interface_down_at_start_is_reported_then_counted_once_up():
    with namespace_pair() as pair:
        pair.server("ip", "link", "set", pair.server_link, "down")
        exporter = NamespacedExporter(pair, ["--interface", pair.server_link])
        try:
            # First the socket's ENETDOWN, then, from the first restart on, the steady explanation.
            expected = f"{pair.server_link}: interface is down; capture resumes when it is up"
            exporter.wait_until(lambda: exporter.root().get("capture", {}).get("error") == expected, 20,
                                "the down interface reported in /")
            assert exporter.value("traffic_exporter_capture_up") == 0
            pair.server("ip", "link", "set", pair.server_link, "up")
            exporter.wait_until(lambda: exporter.value("traffic_exporter_capture_up") == 1, 40, "capture_up 1")
            send_udp(pair)
            exporter.wait_quiet()
            assert dns_in_bytes(exporter, pair) == 5 * (14 + 20 + 8 + 200)
        finally:
            exporter.stop()
