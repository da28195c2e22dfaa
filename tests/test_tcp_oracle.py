"""TCP health against independent oracles: tshark's TCP analysis, and a brute-force record of every byte range seen.

Per frame, on the hand-built capture (tests/tcp_traffic.py), on the corpus captures with TCP (tcpdump's
test suite, tests/data/README.md) and on a benchmark capture (bench/generate.py):

- handshake round trip = tshark's ``tcp.analysis.initial_rtt`` (last SYN -> the ACK completing the
  handshake) minus that SYN -> the last SYN-ACK before the ACK, to the microsecond;
- retransmitted segments = exactly the payload segments whose whole range an unbounded record of the
  byte ranges seen so far already holds (the exporter bounds its record to 4 gaps per direction; no
  capture here has more), and within tshark's retransmissions (``retransmission``,
  ``fast_retransmission``, ``spurious_retransmission``): tshark also calls a segment that fills a gap a
  "retransmission" when it comes later than the round trip (it assumes the first copy was lost before
  the capture point); the exporter saw those bytes for the first time, so they are new data. Every such
  frame must be one the brute-force record shows filling a gap;
- payload segments = tshark's frames with TCP payload, no SYN or RST, not ``keep_alive``.
"""
from __future__ import annotations

import ipaddress
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from bench.generate import write_pcap
from exporter.headers import parse_frames
from exporter.replay import PcapSource
from exporter.tcpflows import (EVENT_RETRANSMISSION, EVENT_RTT, EVENT_SEGMENT, FlowTable, TcpFamily,
                               native_library, tcp_columns)
from tests.builders import CORPUS_PCAPS
from tests.tcp_oracle import (RST, SYN, brute_force_retransmissions, servers_of, tshark_frames,
                              tshark_round_trips)
from tests.tcp_traffic import build

pytestmark = pytest.mark.skipif(not shutil.which("tshark"), reason="tshark not installed")

# corpus captures with TCP between two distinct hosts (resp_*: both ends 127.0.0.1, counted as internal)
CORPUS_TCP = ["dns_tcp.pcap", "mptcp-v0.pcap", "mptcp-v1.pcap", "ssh.pcap", "tcp-handshake-nano.pcap",
              "timestamp_invalid_micro.pcap"]


def our_events(path: Path, servers: set[str]) -> dict[int, tuple[int, int]]:
    """Frame number -> (EVENT_* bits, round trip ns) of the exporter's tracker, native if built."""
    table = FlowTable(100_000, native=native_library() is not None)
    columns = tcp_columns(1)
    found, first = {}, 1
    packed = {ipaddress.ip_address(server) for server in servers}
    for batch in PcapSource(str(path), timestamps=True).batches(threading.Event()):
        parsed = parse_frames(batch.link_type, batch.buffer, batch.starts, batch.ends)
        assert parsed is not None
        parts = []
        for family, ip in zip((4, 6), parsed[1]):
            def address(hi, lo):
                value = int(hi) << 64 | int(lo)
                return ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value)
            src = np.array([address(h, l) in packed for h, l in zip(ip.src_hi, ip.src_lo)], bool)
            dst = np.array([address(h, l) in packed for h, l in zip(ip.dst_hi, ip.dst_lo)], bool)
            rows = np.where(src != dst, 0, -1).astype(np.int64)
            parts.append(TcpFamily(family, ip, dst, rows, np.zeros(len(rows), np.uint8)))
        sums = np.zeros((1, columns.width), np.int64)
        results = table.track(batch.buffer, batch.starts, batch.wire_lengths, batch.timestamps, parts, sums, columns)
        for part, (events, rtt) in zip(parts, results):
            for index, event, elapsed in zip(part.frames.index.tolist(), events.tolist(), rtt.tolist()):
                if event:
                    found[first + index] = (event, elapsed)
        first += len(batch)
    return found


def compare(path: Path, round_trips_comparable: bool = True) -> dict:
    """Check every comparison of the module docstring on one capture; return what was compared."""
    frames = tshark_frames(path)
    servers = servers_of(frames) or {max({f["dst"] for f in frames}, key=lambda a: sum(f["dst"] == a for f in frames))}
    ours = our_events(path, servers)
    counted = [f for f in frames if (f["src"] in servers) != (f["dst"] in servers)]
    retransmitted, gap_fillers = brute_force_retransmissions(counted)
    our_retransmissions = {number for number, (event, _) in ours.items() if event & EVENT_RETRANSMISSION}
    assert our_retransmissions == retransmitted
    tshark_retransmissions = {f["number"] for f in counted
                              if f["retransmission"] and f["length"] > 0 and not f["flags"] & (SYN | RST)}
    assert our_retransmissions <= tshark_retransmissions
    assert tshark_retransmissions - our_retransmissions <= gap_fillers  # late gap fillers: see the docstring
    segments = {f["number"] for f in counted if f["length"] > 0 and not f["flags"] & (SYN | RST) and not f["keep_alive"]}
    assert {number for number, (event, _) in ours.items() if event & EVENT_SEGMENT} == segments
    round_trips = {number: elapsed / 1e9 for number, (event, elapsed) in ours.items() if event & EVENT_RTT}
    expected = tshark_round_trips(counted, servers)
    assert round_trips.keys() == expected.keys()
    for number, elapsed in round_trips.items():
        if round_trips_comparable:
            assert elapsed == pytest.approx(expected[number], abs=1.5e-6), number
    return {"retransmitted": len(our_retransmissions), "tshark_only": len(tshark_retransmissions - our_retransmissions),
            "segments": len(segments), "handshakes": len(round_trips)}


def test_the_hand_built_capture_agrees_with_tshark_but_for_the_late_gap_filler(tmp_path):
    path = tmp_path / "tcp.pcap"
    truth = build(path)
    compared = compare(path)
    assert compared == {"retransmitted": sum(sum(t["retransmitted"].values()) for t in truth.values()),
                        "tshark_only": 1,  # client A's gap filled 330 ms late
                        "segments": sum(sum(t["segments"].values()) for t in truth.values()),
                        "handshakes": sum(len(t["rtt"]) for t in truth.values())}


@pytest.mark.parametrize("name", CORPUS_TCP)
def test_corpus_captures_agree_with_tshark(name):
    # timestamp_invalid_micro.pcap holds microsecond fractions of 10**6 and 2**31: the exporter reads
    # seconds + fraction / 10**6 (as its pacing does), tshark shows them otherwise, so only which
    # frame completes the handshake is compared there, not the round trip.
    compared = compare(CORPUS_PCAPS / name, round_trips_comparable=name != "timestamp_invalid_micro.pcap")
    assert compared["segments"] > 0 or compared["handshakes"] > 0


def test_a_benchmark_capture_of_repeated_segments_agrees_with_tshark(tmp_path):
    """bench.generate repeats 4096 template frames: every repeat of a TCP payload segment is retransmitted."""
    path = tmp_path / "friendly.pcap"
    write_pcap(str(path), 20_000, clients=50)
    compared = compare(path)
    assert compared["retransmitted"] > 1000
