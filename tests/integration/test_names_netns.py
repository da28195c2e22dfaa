"""--resolve-names for real: the system resolver inside a namespace whose /etc/hosts the test writes.

``ip netns exec`` binds /etc/netns/NAME/hosts (and resolv.conf) over /etc's, so the PTR answers are
the test's, the machine's files stay untouched, and no query leaves the namespace (its resolv.conf
points at 127.0.0.1, where nothing answers; it has no route out either).
"""
import json
import subprocess
import sys
import tempfile
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from testkit.netns import namespace_hosts, namespace_pair, netns_unavailable_reason
from testkit.process import terminate
from tests.builders import MACS

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(netns_unavailable_reason() is not None, reason=str(netns_unavailable_reason()))]

NAMED = {"198.51.100.7": "alpha.example.test", "2001:db8::7": "six.example.test"}
UNNAMED = "203.0.113.9"
FLOOD = 600  # more clients with names, to watch the rate
RATE = 20


def flood_address(index: int) -> str:
    return f"10.77.{index // 250}.{index % 250 + 1}"


def fetch(pair, url: str) -> str:
    return pair.server("curl", "-sS", "--max-time", "5", url).stdout


def test_names_come_from_the_namespaces_hosts_file_at_the_configured_rate(tmp_path):
    pcap = tmp_path / "clients.pcap"
    big = b"x" * 500  # bigger than the flood's frames: among the biggest clients the history keeps per second
    frames = [Ether(**MACS) / IP(src=a, dst="192.0.2.1") / UDP(sport=5000, dport=53) / big for a in (*NAMED, UNNAMED)
              if ":" not in a]
    frames.append(Ether(**MACS) / IPv6(src="2001:db8::7", dst="2001:db8::1") / UDP(sport=5000, dport=53) / big)
    frames += [Ether(**MACS) / IP(src=flood_address(i), dst="192.0.2.1") / UDP(sport=5000, dport=53)
               for i in range(FLOOD)]
    wrpcap(str(pcap), frames)
    hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in NAMED.items())
    hosts += "".join(f"{flood_address(i)} flood-{i}.example.test\n" for i in range(FLOOD))
    port = 18000 + int(time.time()) % 1000
    with namespace_pair() as pair, namespace_hosts(pair.server_ns, hosts), tempfile.TemporaryFile() as output:
        process = subprocess.Popen(pair.server_command(
            sys.executable, "-m", "exporter", "--pcap", str(pcap), "--server-ip", "192.0.2.1,2001:db8::1",
            "--resolve-names", "--resolve-rate", str(RATE), "--max-clients", "1000",
            "--listen", f"127.0.0.1:{port}"), stdout=output, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 20
            while pair.server("curl", "-s", "--max-time", "1", base + "/metrics", check=False).returncode:
                assert process.poll() is None and time.monotonic() < deadline, "exporter did not start"
                time.sleep(0.2)
            started = time.monotonic()
            observations = []  # (seconds since ready, clients with a name, queries made)
            while time.monotonic() - started < 8:
                families = {f.name: f for f in text_string_to_metric_families(fetch(pair, base + "/metrics"))}
                hostnames = {s.labels["client"]: s.labels["hostname"] for s in families["traffic_client_info"].samples}
                queries = families["traffic_exporter_name_queries"].samples[0].value
                observations.append((time.monotonic() - started, sum(1 for h in hostnames.values() if h), queries))
                time.sleep(0.5)
            traffic = json.loads(fetch(pair, base + "/traffic?limit=1000"))
        finally:
            terminate(process)
    for seconds, named, queries in observations:  # the resolver started at most 1 s before "ready"
        assert named <= queries <= RATE * (seconds + 1) + 3, observations
    assert observations[-1][2] >= RATE * 5, observations  # and it kept its pace
    assert hostnames["198.51.100.7"] == "alpha.example.test" and hostnames["2001:db8::7"] == "six.example.test"
    assert hostnames[UNNAMED] == ""
    for client, name in hostnames.items():
        if client.startswith("10.77."):
            assert name in ("", f"flood-{(int(client.split('.')[2]) * 250 + int(client.split('.')[3]) - 1)}.example.test")
    entries = {entry["ip"]: entry for entry in traffic["clients"]}
    assert entries["198.51.100.7"].get("hostname") == "alpha.example.test"
    assert entries["2001:db8::7"].get("hostname") == "six.example.test"
    assert not set(entries[UNNAMED]) & {"hostname", "asn", "as_org", "country"}  # nothing known: no fact fields


def test_summarize_prints_the_names_of_the_namespaces_hosts_file(tmp_path):
    pcap = tmp_path / "clients.pcap"
    wrpcap(str(pcap), [Ether(**MACS) / IP(src="198.51.100.7", dst="192.0.2.1") / UDP(sport=5000, dport=53),
                       Ether(**MACS) / IP(src=UNNAMED, dst="192.0.2.1") / UDP(sport=5000, dport=53),
                       Ether(**MACS) / IPv6(src="2001:db8::7", dst="2001:db8::1") / UDP(sport=5000, dport=53)])
    hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in NAMED.items())
    with namespace_pair() as pair, namespace_hosts(pair.server_ns, hosts):
        command = [sys.executable, "-m", "exporter", "summarize", str(pcap), "--server-ip", "192.0.2.1,2001:db8::1",
                   "--resolve-names", "--resolve-rate", "100"]
        result = pair.server(*command, "--format", "json", timeout=60)
        table = pair.server(*command, timeout=60).stdout
    clients = {c["ip"]: c for c in json.loads(result.stdout)["clients"]}
    assert clients["198.51.100.7"]["hostname"] == "alpha.example.test"
    assert clients["2001:db8::7"]["hostname"] == "six.example.test"
    assert "hostname" not in clients[UNNAMED]
    assert "198.51.100.7 (alpha.example.test)" in table and "2001:db8::7 (six.example.test)" in table
