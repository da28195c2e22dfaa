"""PACKET_FANOUT: two exporters in one fanout group split a link by flow and together count it exactly."""
from __future__ import annotations

import subprocess
import sys

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from testkit.live_traffic import REPO_ROOT, NamespacedExporter
from testkit.netns import namespace_pair, netns_unavailable_reason

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(netns_unavailable_reason() is not None,
                                 reason=netns_unavailable_reason() or "")]
GROUP = "4242"
CLIENTS = 120


def conversation_frames(pair) -> list:
    """Three requests and three answers of one TCP flow per client, all on the pair's own subnet."""
    frames = []
    for index in range(CLIENTS):
        client, port = f"10.199.{pair.subnet}.{10 + index}", 40000 + index
        request = (Ether(src=pair.client_mac, dst=pair.server_mac) / IP(src=client, dst=pair.server_v4)
                   / TCP(sport=port, dport=443) / (b"q" * (index % 50)))
        answer = (Ether(src=pair.server_mac, dst=pair.client_mac) / IP(src=pair.server_v4, dst=client)
                  / TCP(sport=443, dport=port) / (b"a" * (100 + index)))
        frames += [request, answer] * 3
    return frames


def test_a_fanout_group_splits_flows_whole_and_the_shares_add_up(write_pcap):
    with namespace_pair() as pair:
        frames = conversation_frames(pair)
        expected: dict = {}
        for frame in frames:
            inbound = frame[IP].dst == pair.server_v4
            key = (frame[IP].src if inbound else frame[IP].dst, "in" if inbound else "out", "HTTPS")
            nbytes, packets = expected.get(key, (0, 0))
            expected[key] = (nbytes + len(frame), packets + 1)
        pcap = write_pcap("conversations.pcap", frames)
        args = ["--interface", pair.server_link, "--server-ip", pair.server_v4, "--fanout-group", GROUP,
                "--log-level", "warning"]
        exporters = [NamespacedExporter(pair, args, port=port) for port in (18000, 18001)]
        try:
            for exporter in exporters:
                exporter.wait_ready()
            pair.client("tcpreplay", "-q", "-i", pair.client_link, "--pps=2000", str(pcap), timeout=60)
            for exporter in exporters:
                exporter.wait_quiet(timeout=30)
            shares = [exporter.client_series() for exporter in exporters]
        finally:
            for exporter in exporters:
                exporter.stop()
    combined = {**shares[0], **shares[1]}
    assert len(combined) == len(shares[0]) + len(shares[1])  # no series in both: each flow went to one
    assert combined == expected
    for share in shares:
        clients = {client for client, _, _ in share}
        assert 0 < len(clients) < CLIENTS  # both exporters got a part
        assert all((client, direction, "HTTPS") in share for client in clients for direction in ("in", "out"))


def test_joining_a_fanout_group_of_another_interface_stops_start_up_with_one_line():
    with namespace_pair() as pair:
        first = NamespacedExporter(pair, ["--interface", pair.server_link, "--server-ip", pair.server_v4,
                                          "--fanout-group", GROUP, "--log-level", "warning"])
        try:
            first.wait_ready()
            second = subprocess.run(
                pair.server_command(sys.executable, "-m", "exporter", "--interface", "lo", "--server-ip", "127.0.0.1",
                                    "--fanout-group", GROUP, "--listen", "127.0.0.1:18001"),
                capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
        finally:
            first.stop()
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--fanout-group: cannot join fanout group {GROUP}" in lines[0], second.stderr
