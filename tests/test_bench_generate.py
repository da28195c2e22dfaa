"""The benchmark's worst-case traffic is what it claims to be, as Scapy's own dissection reads it."""
import collections
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Padding
from scapy.utils import RawPcapReader

from bench.generate import SERVER_V4, SERVER_V6, worst_case_frames, write_worst_case_pcap

ROOT = Path(__file__).resolve().parents[1]
SERVERS = (SERVER_V4, SERVER_V6)
SAMPLE = 6000


def dissect(frames) -> list[Ether]:
    return [Ether(frame) for frame in frames]


def network_layer(packet: Ether):
    return packet[IP] if IP in packet else packet[IPv6] if IPv6 in packet else None


def flow(packet: Ether) -> tuple:
    """(src, dst, protocol, source port or echo identifier, destination port); no ports in later fragments."""
    ip = network_layer(packet)
    for layer in (TCP, UDP):
        if layer in packet:
            return ip.src, ip.dst, layer.__name__, packet[layer].sport, packet[layer].dport
    for layer in (ICMP, ICMPv6EchoRequest, ICMPv6EchoReply):
        if layer in packet:
            return ip.src, ip.dst, "echo", packet[layer].id, None
    return ip.src, ip.dst, "fragment", None, None


def label(packet: Ether) -> tuple:
    """("tcp" | "udp", server port) or ("icmp", 0), for frames to or from the server."""
    ip = network_layer(packet)
    server_is_source = ip.src in SERVERS
    for layer in (TCP, UDP):
        if layer in packet:
            return layer.__name__.lower(), packet[layer].sport if server_is_source else packet[layer].dport
    if ICMP in packet or ICMPv6EchoRequest in packet or ICMPv6EchoReply in packet:
        return "icmp", 0
    return "fragment", 0


@pytest.fixture(scope="module")
def sample() -> list[Ether]:
    return dissect(worst_case_frames(SAMPLE))


def test_worst_case_mix_has_the_stated_shares(sample):
    ip_frames = [packet for packet in sample if network_layer(packet) is not None]
    ipv4 = [packet for packet in ip_frames if IP in packet]
    ipv6 = [packet for packet in ip_frames if IPv6 in packet]
    arp = [packet for packet in sample if ARP in packet]
    assert len(arp) + len(ip_frames) == SAMPLE
    assert len(arp) / SAMPLE == pytest.approx(0.02, abs=0.006)
    assert len(ipv6) / len(ip_frames) == pytest.approx(0.3, abs=0.02)
    other_hosts = [packet for packet in ip_frames
                   if not {network_layer(packet).src, network_layer(packet).dst} & set(SERVERS)]
    assert len(other_hosts) / SAMPLE == pytest.approx(0.03, abs=0.007)

    tagged = [packet for packet in ipv4 if Dot1Q in packet]
    double = [packet for packet in tagged if Dot1AD in packet]
    assert len(tagged) / len(ipv4) == pytest.approx(1 / 3, abs=0.03)
    assert len(double) / len(tagged) == pytest.approx(0.5, abs=0.05)
    assert all(packet[Ether].type == 0x88A8 and packet[Dot1AD].type == 0x8100 for packet in double)
    assert not any(Dot1Q in packet for packet in ipv6 + arp)

    hop_by_hop = [packet for packet in ipv6 if IPv6ExtHdrHopByHop in packet]
    assert len(hop_by_hop) / len(ipv6) == pytest.approx(0.1, abs=0.02)
    with_options = [packet for packet in ipv4 if packet[IP].options]
    assert len(with_options) / len(ipv4) == pytest.approx(0.05, abs=0.015)
    v4_fragments = [packet for packet in ipv4 if packet[IP].flags.MF or packet[IP].frag]
    v6_fragments = [packet for packet in ipv6 if IPv6ExtHdrFragment in packet]
    for fragments, family in ((v4_fragments, ipv4), (v6_fragments, ipv6)):
        assert len(fragments) / len(family) == pytest.approx(0.03, abs=0.012)
        first = [packet for packet in fragments if TCP in packet or UDP in packet or ICMP in packet
                 or ICMPv6EchoRequest in packet or ICMPv6EchoReply in packet]
        assert 0 < len(first) < len(fragments)  # first fragments with ports, later ones without


def test_worst_case_covers_every_protocol_label_in_both_directions(sample):
    to_server = collections.Counter()
    from_server = collections.Counter()
    for packet in sample:
        ip = network_layer(packet)
        if ip is None:
            continue
        if ip.dst in SERVERS:
            to_server[label(packet)] += 1
        elif ip.src in SERVERS:
            from_server[label(packet)] += 1
    named = {("tcp", 80), ("tcp", 8080), ("tcp", 443), ("tcp", 21), ("tcp", 22), ("tcp", 53), ("udp", 53),
             ("udp", 443), ("icmp", 0)}
    for seen in (to_server, from_server):
        assert named <= set(seen)
        assert {kind for kind, port in set(seen) - named - {("fragment", 0)}} >= {"tcp", "udp"}  # other ports
    echoes = collections.Counter(type(layer).__name__ for packet in sample
                                 for layer in (packet.getlayer(ICMP), packet.getlayer(ICMPv6EchoRequest),
                                               packet.getlayer(ICMPv6EchoReply)) if layer is not None)
    assert set(echoes) == {"ICMP", "ICMPv6EchoRequest", "ICMPv6EchoReply"}


def test_worst_case_makes_every_frame_a_new_flow(sample):
    flows = [flow(packet) for packet in sample if network_layer(packet) is not None]
    with_ports = [key for key in flows if key[2] != "fragment"]
    assert len(set(with_ports)) == len(with_ports)
    assert len(set(flows)) >= 0.98 * len(flows)


def test_worst_case_ports_stay_fresh_when_few_clients_send_many_frames():
    frames = dissect(worst_case_frames(4000, clients=10))
    flows = [flow(packet) for packet in frames if network_layer(packet) is not None]
    with_ports = [key for key in flows if key[2] != "fragment"]
    clients = {address for key in flows for address in key[:2]
               if address not in SERVERS and not address.startswith(("10.98.", "fd00:98:"))}
    assert len(clients) == 10
    assert len(set(with_ports)) == len(with_ports)


def test_worst_case_frames_fit_the_ethernet_limits(sample):
    for packet in sample:
        # Linux sends at most the MTU (1500) plus the Ethernet header, plus one VLAN tag when tagged.
        assert 60 <= len(packet) <= 1514 + (4 if Dot1Q in packet else 0)


def test_worst_case_headers_agree_with_frame_lengths(sample):
    for packet in sample:
        padding = len(packet[Padding].load) if Padding in packet else 0
        ip = network_layer(packet)
        if ip is None:
            continue
        carried = len(ip) - padding
        assert (ip.len if IP in packet else ip.plen + 40) == carried
        if UDP in packet:
            assert packet[UDP].len == len(packet[UDP]) - padding


def test_worst_case_is_deterministic_for_a_seed():
    assert list(worst_case_frames(500, seed=7)) == list(worst_case_frames(500, seed=7))
    assert list(worst_case_frames(500, seed=7)) != list(worst_case_frames(500, seed=8))


def test_worst_case_pcap_of_600k_frames_is_written_within_10_seconds(tmp_path):
    path = tmp_path / "worst.pcap"
    started = time.process_time()  # CPU time: other processes sharing the cores do not count
    write_worst_case_pcap(str(path), 600_000)
    assert time.process_time() - started < 10
    lengths = [metadata.wirelen for _frame, metadata in RawPcapReader(str(path))]
    assert len(lengths) == 600_000
    assert lengths[:SAMPLE] == [len(frame) for frame in worst_case_frames(SAMPLE)]


def test_generate_cli_writes_worst_case_frames(tmp_path):
    path = tmp_path / "worst.pcap"
    subprocess.run([sys.executable, "-m", "bench.generate", str(path), "--worst-case", "--frames", "300"],
                   cwd=ROOT, check=True, timeout=60)
    assert [frame for frame, _metadata in RawPcapReader(str(path))] == list(worst_case_frames(300))


@pytest.mark.parametrize("argv, message", [(["--frames", "0"], "expected at least 1 frame"),
                                            (["--frames", "many"], "expected a whole number")])
def test_generate_cli_rejects_a_bad_frame_count_in_one_line(tmp_path, argv, message):
    result = subprocess.run([sys.executable, "-m", "bench.generate", str(tmp_path / "x.pcap"), *argv],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_generate_cli_reports_an_unwritable_path_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.generate", str(tmp_path / "missing" / "x.pcap"),
                             "--worst-case", "--frames", "10"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("bench.generate: cannot write") and "Traceback" not in result.stderr
