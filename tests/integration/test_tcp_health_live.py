"""Live TCP health: real connections through a delaying, dropping forwarder, counted by the exporter.

A client namespace reaches the server namespace only through testkit/forwarder.py's middle namespace
(DELAY each way; chosen payload segments dropped). The exporter captures on the server's link and
tcpdump records the same link. The exporter's per-client TCP health must equal

- what the engine computes from tcpdump's file (the exporter replaying it: ``summarize`` does not
  report TCP health yet),
- a reference computed here from tshark's dissection of that file under the contract's definitions
  (docs/architecture.md: handshake RTT from the last SYN-ACK to the completing ACK; a payload
  segment is retransmitted when its whole sequence range was already seen in its direction;
  keep-alives are not segments), and what the scenario makes happen by construction,

and agree with tshark's own TCP analysis, whose definitions differ in two ways (see
``test_tshark_analysis_agrees_where_its_definitions_match``).
"""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from testkit.forwarder import forwarded_pair, forwarding
from testkit.live_traffic import NamespacedExporter, Tcpdump, running_servers, shared_frame_timestamps
from testkit.netns import netns_unavailable_reason
from testkit.process import get, running_exporter

pytestmark = pytest.mark.integration

_reason = netns_unavailable_reason()
if _reason is None and (shutil.which("tcpdump") is None or shutil.which("tshark") is None):
    _reason = "tcpdump and tshark are needed"
if _reason:
    pytest.skip(_reason, allow_module_level=True)

REPO_ROOT = Path(__file__).resolve().parents[2]
DELAY = 0.015  # one way: handshake RTTs of ~30 ms, far from the 25 and 50 ms bucket bounds
SLACK = 0.015
DOWNLOAD_BYTES = 300_000
UPLOAD_BYTES = 150_000
DROP_OUT = (5, 40)  # payload segments server -> client: the 5th and 40th of the first download
# Payload segments client -> server: the two GETs are 1 and 2, the upload starts at 3.
DROP_IN = (8,)
RTT_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LABELS = {80: "HTTP", 8080: "HTTP", 443: "HTTPS"}

# Client side: the two downloads run before (curl), then this script: an upload to the 443 sink,
# two requests per family to 8080, a connection refused by a closed port (the server resets) and
# one the client aborts (SO_LINGER 0: the client resets, and resets again when the server's ACK
# of its last data arrives after the close).
CLIENT_SCRIPT = r'''
import socket, struct, sys, urllib.request
server_v4, server_v6, upload = sys.argv[1], sys.argv[2], int(sys.argv[3])
with socket.create_connection((server_v4, 443), timeout=10) as sock:
    sock.sendall(b"u" * upload)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(10)
for url in (f"http://{server_v4}:8080/", f"http://{server_v4}:8080/", f"http://[{server_v6}]:8080/",
            f"http://[{server_v6}]:8080/"):
    urllib.request.urlopen(url, timeout=10).read()
try:
    socket.create_connection((server_v4, 9), timeout=5)
except ConnectionRefusedError:
    pass
sock = socket.create_connection((server_v4, 443), timeout=10)
sock.sendall(b"abort")
sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
sock.close()
print("done", flush=True)
'''

TSHARK_FIELDS = ("frame.time_epoch", "tcp.stream", "ip.src", "ipv6.src", "ip.dst", "ipv6.dst", "tcp.srcport",
                 "tcp.dstport", "tcp.flags", "tcp.seq", "tcp.ack", "tcp.len", "tcp.analysis.retransmission",
                 "tcp.analysis.fast_retransmission", "tcp.analysis.spurious_retransmission",
                 "tcp.analysis.out_of_order", "tcp.analysis.keep_alive", "tcp.analysis.initial_rtt")
SYN, RST, ACK = 0x02, 0x04, 0x10


def tshark_frames(capture: Path) -> list[dict]:
    """Every TCP frame of ``capture`` as a dict of TSHARK_FIELDS (relative sequence numbers)."""
    argv = ["tshark", "-r", str(capture), "-n", "-Y", "tcp", "-T", "fields", "-E", "occurrence=f",
            *(arg for name in TSHARK_FIELDS for arg in ("-e", name))]
    lines = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    return [dict(zip(TSHARK_FIELDS, line.split("\t"))) for line in lines]


def reference(frames: list[dict], servers: set[str]) -> dict:
    """TCP health per client from tshark's dissection, under the contract's definitions (not tshark's)."""
    handshakes: Counter = Counter()  # (client, protocol)
    rtts: dict[str, list[float]] = defaultdict(list)
    segments: Counter = Counter()  # (client, direction)
    retransmitted: Counter = Counter()
    resets: Counter = Counter()
    tshark_resent: Counter = Counter()  # tshark's flags on the same payload segments
    tshark_strict: Counter = Counter()
    tshark_rtts: dict[str, list[float]] = defaultdict(list)
    seen: dict[tuple, list[tuple[int, int]]] = defaultdict(list)  # (stream, direction) -> byte ranges
    highest: dict[tuple, int] = {}
    syn_at, synack_at, complete = {}, {}, set()
    for frame in frames:
        src, dst = frame["ip.src"] or frame["ipv6.src"], frame["ip.dst"] or frame["ipv6.dst"]
        direction, client = ("in", src) if dst in servers else ("out", dst)
        server_port = int(frame["tcp.dstport"] if direction == "in" else frame["tcp.srcport"])
        stream, flags, time = frame["tcp.stream"], int(frame["tcp.flags"], 16), float(frame["frame.time_epoch"])
        seq, length = int(frame["tcp.seq"]), int(frame["tcp.len"])
        if flags & RST:
            resets[client, direction] += 1
        if flags & SYN and not flags & ACK and direction == "in":
            syn_at.setdefault(stream, time)
        elif flags & SYN and flags & ACK and direction == "out":
            synack_at[stream] = time  # a resent SYN-ACK: time counts from the last one
        elif (direction == "in" and flags & ACK and not flags & (SYN | RST) and stream in synack_at
              and stream not in complete and int(frame["tcp.ack"]) == 1):
            complete.add(stream)
            handshakes[client, LABELS.get(server_port, "OTHER")] += 1
            rtts[client].append(time - synack_at[stream])
            if frame["tcp.analysis.initial_rtt"]:  # tshark: SYN to this ACK; minus the server's SYN -> SYN-ACK
                tshark_rtts[client].append(float(frame["tcp.analysis.initial_rtt"])
                                           - (synack_at[stream] - syn_at[stream]))
        if length == 0:
            continue
        key = (stream, direction)
        if length <= 1 and seq == highest.get(key, -2) - 1:
            continue  # a keep-alive: neither a segment nor a retransmission
        segments[client, direction] += 1
        if any(start <= seq and seq + length <= end for start, end in merged(seen[key])):
            retransmitted[client, direction] += 1
        seen[key].append((seq, seq + length))
        highest[key] = max(highest.get(key, 0), seq + length)
        if frame["tcp.analysis.retransmission"] or frame["tcp.analysis.spurious_retransmission"] \
                or frame["tcp.analysis.out_of_order"]:
            tshark_resent[client, direction] += 1
        if frame["tcp.analysis.retransmission"]:
            tshark_strict[client, direction] += 1
    return {"handshakes": dict(handshakes), "rtts": dict(rtts), "segments": dict(segments),
            "retransmitted": dict(retransmitted), "resets": dict(resets), "tshark_resent": dict(tshark_resent),
            "tshark_strict": dict(tshark_strict), "tshark_rtts": dict(tshark_rtts)}


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges merged where they touch or overlap."""
    result: list[list[int]] = []
    for start, end in sorted(ranges):
        if result and start <= result[-1][1]:
            result[-1][1] = max(result[-1][1], end)
        else:
            result.append([start, end])
    return [(start, end) for start, end in result]


def cumulative_buckets(values: list[float]) -> dict[float, int]:
    """Prometheus buckets (upper bound -> observations up to it, +Inf included) of ``values``."""
    buckets = {bound: sum(value <= bound for value in values) for bound in RTT_BOUNDS}
    buckets[float("inf")] = len(values)
    return buckets


def exporter_tcp_health(samples: dict[tuple[str, tuple], float]) -> dict:
    """The per-client TCP health families of a /metrics scrape, keyed like ``reference``."""
    health: dict = {"handshakes": {}, "buckets": defaultdict(dict), "rtt_sum": {}, "rtt_count": {},
                    "segments": {}, "retransmitted": {}, "resets": {}}
    for (name, label_items), value in samples.items():
        labels = dict(label_items)
        client = labels.get("client")
        if name == "traffic_client_tcp_handshakes_total":
            health["handshakes"][client, labels["protocol"]] = int(value)
        elif name == "traffic_client_tcp_handshake_rtt_seconds_bucket":
            health["buckets"][client][float(labels["le"])] = int(value)
        elif name == "traffic_client_tcp_handshake_rtt_seconds_sum":
            health["rtt_sum"][client] = value
        elif name == "traffic_client_tcp_handshake_rtt_seconds_count":
            health["rtt_count"][client] = int(value)
        elif name in ("traffic_client_tcp_segments_total", "traffic_client_tcp_retransmitted_segments_total",
                      "traffic_client_tcp_resets_total"):
            kind = name.removeprefix("traffic_client_tcp_").removesuffix("_total").removesuffix("_segments")
            kind = {"segments": "segments", "retransmitted": "retransmitted", "resets": "resets"}[kind]
            if value:
                health[kind][client, labels["direction"]] = int(value)
    health["buckets"] = dict(health["buckets"])
    return health


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of an exposition: (name, sorted label items) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def replayed_metrics(capture: Path, servers: list[str], timeout: float = 60) -> dict[tuple[str, tuple], float]:
    """/metrics of the exporter once it has replayed ``capture`` to the end (its capture is then down)."""
    args = ["--pcap", str(capture), "--log-level", "warning"]
    for server in servers:
        args += ["--server-ip", server]
    with running_exporter(args, cwd=REPO_ROOT) as (url, _process):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            samples = parse_metrics(get(url + "/metrics").decode())
            if samples.get(("traffic_exporter_capture_up", ())) == 0:
                return samples
            time.sleep(0.2)
    raise AssertionError(f"the replay of {capture} did not finish within {timeout} s")


@pytest.fixture(scope="module", params=["af_packet", "libpcap"])
def live(request, tmp_path_factory) -> dict:
    """The scenario, once per capture backend: exporter and tcpdump on the server's link, traffic through the forwarder."""
    directory = tmp_path_factory.mktemp("tcp-health")
    (directory / "file.bin").write_bytes(random.Random(2).randbytes(DOWNLOAD_BYTES))
    capture = directory / "server.pcap"
    with shared_frame_timestamps(), forwarded_pair() as pair, running_servers(pair, directory), \
            forwarding(pair, delay=DELAY, drop_out=DROP_OUT, drop_in=DROP_IN) as forwarder:
        exporter = NamespacedExporter(pair, ["--interface", pair.server_link, "--capture-backend", request.param])
        try:
            exporter.wait_ready()
            tcpdump = Tcpdump(pair, capture, options=["--time-stamp-precision", "nano", "tcp"])
            try:
                for url in (f"http://{pair.server_v4}/file.bin", f"http://[{pair.server_v6}]/file.bin"):
                    pair.client("curl", "-sS", "--max-time", "15", "-o", "/dev/null", url, timeout=20)
                script = directory / "client.py"
                script.write_text(CLIENT_SCRIPT)
                pair.client(sys.executable, str(script), pair.server_v4, pair.server_v6, str(UPLOAD_BYTES),
                            timeout=60)
                exporter.wait_quiet()
            finally:
                tcpdump_summary = tcpdump.stop()
            samples = exporter.metrics()
        finally:
            log = exporter.stop()
    servers = [pair.server_v4, pair.server_v6]
    return {"pair": pair, "backend": request.param, "exporter": exporter_tcp_health(samples), "samples": samples, "log": log,
            "reference": reference(tshark_frames(capture), set(servers)),
            "replayed": exporter_tcp_health(replayed_metrics(capture, servers)),
            "forwarder": forwarder.report, "tcpdump": tcpdump_summary}


def test_the_scenario_ran_as_planned(live):
    report, pair = live["forwarder"], live["pair"]
    assert "0 packets dropped by kernel" in live["tcpdump"], live["tcpdump"]
    assert live["samples"].get(("traffic_exporter_kernel_dropped_packets_total", ())) == 0
    assert sorted((drop["direction"], drop["number"]) for drop in report["dropped"]) == \
        sorted([("in", number) for number in DROP_IN] + [("out", number) for number in DROP_OUT]), report["dropped"]
    assert {drop["dst"] if drop["direction"] == "out" else drop["src"] for drop in report["dropped"]} == {pair.client_v4}
    assert (report["oversized"], report["kernel_drops"], report["queue_overflow"]) == (0, 0, 0), report


def test_live_tcp_health_equals_the_engine_on_tcpdumps_file(live):
    live_health, replayed = live["exporter"], live["replayed"]
    assert live_health["handshakes"] and live_health["retransmitted"] and live_health["resets"]
    for family in ("handshakes", "buckets", "rtt_count", "segments", "retransmitted", "resets"):
        assert live_health[family] == replayed[family], family
    # The engine takes times to the microsecond: the ring's nanosecond stamps round as tcpdump's file's
    # do; libpcap hands over microseconds already cut, so each of a round trip's two frames may be 1 us off.
    for client, total in replayed["rtt_sum"].items():
        tolerance = 1e-9 if live["backend"] == "af_packet" else 2e-6 * live_health["rtt_count"][client]
        assert live_health["rtt_sum"][client] == pytest.approx(total, abs=tolerance)


def test_handshakes_per_client_and_protocol_equal_the_capture_and_the_scenario(live):
    pair = live["pair"]
    by_construction = {(pair.client_v4, "HTTP"): 3, (pair.client_v4, "HTTPS"): 2, (pair.client_v6, "HTTP"): 3}
    assert live["reference"]["handshakes"] == by_construction
    assert live["exporter"]["handshakes"] == by_construction, live["log"]


def test_handshake_rtt_histograms_equal_the_capture_and_last_two_one_way_delays(live):
    exporter, rtts = live["exporter"], live["reference"]["rtts"]
    assert set(exporter["buckets"]) == set(rtts)
    for client, values in rtts.items():
        assert all(2 * DELAY <= rtt < 2 * DELAY + SLACK for rtt in values), (client, values)
        assert exporter["buckets"][client] == cumulative_buckets(values), client
        assert exporter["rtt_count"][client] == len(values)
        # The exporter's and tcpdump's (nanosecond) timestamps are the kernel's one stamp per frame
        # (shared_frame_timestamps; the forwarder sends every frame afresh, so the kernel stamps each).
        assert exporter["rtt_sum"][client] == pytest.approx(sum(values), abs=1e-6 * len(values))


def test_retransmissions_segments_and_resets_equal_the_capture(live):
    exporter, expected, pair = live["exporter"], live["reference"], live["pair"]
    assert exporter["segments"] == expected["segments"]
    assert exporter["retransmitted"] == expected["retransmitted"]
    assert exporter["resets"] == expected["resets"]
    # The closed port's RST; the aborting client's RST, and another one when the server's ACK of the
    # last data reaches the closed socket (usual with the delay), so at least one in.
    assert set(expected["resets"]) == {(pair.client_v4, "in"), (pair.client_v4, "out")}
    assert expected["resets"][pair.client_v4, "out"] == 1 and expected["resets"][pair.client_v4, "in"] >= 1
    # Each segment dropped on its way to the client was captured on the server's link twice at least.
    drops_out = sum(drop["direction"] == "out" for drop in live["forwarder"]["dropped"])
    assert expected["retransmitted"].get((pair.client_v4, "out"), 0) >= drops_out
    # A client segment dropped before the server's link was never seen there: its resend fills a
    # hole and is new data at this capture point, not a retransmission.
    assert (pair.client_v4, "in") not in expected["retransmitted"]


def test_tshark_analysis_agrees_where_its_definitions_match(live):
    expected = live["reference"]
    # tshark marks a resent segment "out-of-order" rather than "retransmission" when it follows the
    # direction's highest segment by less than the initial RTT (a resend inside a burst, as seen next
    # to the sender): counted together, they are the contract's retransmissions, direction out.
    out = {key: count for key, count in expected["tshark_resent"].items() if key[1] == "out"}
    assert out == {key: count for key, count in expected["retransmitted"].items() if key[1] == "out"}
    for key, strict in expected["tshark_strict"].items():
        assert strict <= expected["tshark_resent"][key]
    for client, values in expected["tshark_rtts"].items():
        assert values == pytest.approx(expected["rtts"][client], abs=2e-6)
