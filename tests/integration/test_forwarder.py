"""testkit/forwarder.py: a middle namespace delays and drops frames between a client and a server.

Ground truth is outside the forwarder: ping's round trip, the downloaded file's bytes, and tshark's
TCP analysis of tcpdump's capture on the server's own interface.
"""
from __future__ import annotations

import hashlib
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from testkit.forwarder import forwarded_pair, forwarding
from testkit.live_traffic import Tcpdump, running_servers
from testkit.netns import netns_unavailable_reason

pytestmark = pytest.mark.integration

_reason = netns_unavailable_reason()
if _reason is None:
    missing = [tool for tool in ("ping", "curl", "tcpdump", "tshark") if shutil.which(tool) is None]
    _reason = f"missing {', '.join(missing)}" if missing else None
if _reason:
    pytest.skip(_reason, allow_module_level=True)

DELAY = 0.02  # one way, each direction
SLACK = 0.015  # scheduling of a Python forwarder on a busy 2-core machine
DOWNLOAD_BYTES = 300_000  # ~210 full segments out
ETHERNET_MTU_FRAME = 1514


def ping_rtts(pair, family: str, address: str, count: int = 3) -> list[float]:
    """Round trips in seconds, one per reply."""
    output = pair.client("ping", family, "-c", str(count), "-i", "0.2", "-W", "2", address).stdout
    return [float(ms) / 1000 for ms in re.findall(r"time=([\d.]+) ms", output)]


def tshark(capture: Path, display_filter: str, *fields: str) -> list[list[str]]:
    """One row of ``fields`` per frame matching ``display_filter`` (absolute sequence numbers)."""
    argv = ["tshark", "-r", str(capture), "-n", "-o", "tcp.relative_sequence_numbers:FALSE",
            "-Y", display_filter, "-T", "fields", *(arg for name in fields for arg in ("-e", name))]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return [line.split("\t") for line in result.stdout.splitlines() if line.strip()]


def test_nothing_passes_without_the_forwarder_and_ping_takes_twice_the_delay_through_it():
    with forwarded_pair() as pair:
        assert pair.client("ping", "-c", "1", "-W", "1", pair.server_v4, check=False).returncode != 0
        with forwarding(pair, delay=DELAY) as forwarder:
            rtts = {family: ping_rtts(pair, family, address)
                    for family, address in (("-4", pair.server_v4), ("-6", pair.server_v6))}
    for family, values in rtts.items():
        assert len(values) == 3, (family, values)
        assert all(2 * DELAY <= rtt < 2 * DELAY + SLACK for rtt in values), (family, values)
    report = forwarder.report
    assert report["forwarded"]["in"] >= 6 and report["forwarded"]["out"] >= 6, report
    assert report["dropped"] == [] and report["kernel_drops"] == 0, report


@pytest.mark.parametrize(
    "drops",
    [{}, {"drop_out": (5, 40)}, {"drop_probability": 0.04, "seed": 7}],
    ids=["no-drops", "drop-5th-and-40th-out", "drop-4%-out-seed-7"],
)
def test_download_through_drops_is_complete_and_tshark_sees_each_drop_retransmitted(tmp_path, drops):
    www = tmp_path / "www"
    www.mkdir()
    content = random.Random(1).randbytes(DOWNLOAD_BYTES)
    (www / "file.bin").write_bytes(content)
    received, capture = tmp_path / "received.bin", tmp_path / "server.pcap"
    with forwarded_pair() as pair, running_servers(pair, www), forwarding(pair, delay=DELAY, **drops) as forwarder:
        tcpdump = Tcpdump(pair, capture, options=["tcp", "port", "80"])
        try:
            pair.client("curl", "-sS", "--max-time", "15", "-o", str(received),
                        f"http://{pair.server_v4}/file.bin", timeout=20)
        finally:
            tcpdump.stop()
    report = forwarder.report
    assert hashlib.sha256(received.read_bytes()).digest() == hashlib.sha256(content).digest()
    assert (report["oversized"], report["queue_overflow"], report["send_errors"], report["kernel_drops"]) == (0, 0, 0, 0), report

    dropped = report["dropped"]
    if "drop_out" in drops:
        assert [(drop["direction"], drop["number"]) for drop in dropped] == [("out", 5), ("out", 40)]
    elif drops:
        assert dropped and {drop["direction"] for drop in dropped} == {"out"}
    else:
        assert dropped == []
    for drop in dropped:
        assert (drop["src"], drop["sport"], drop["payload"]) == (pair.server_v4, 80, 1448), drop

    # The capture is on the server's link: it holds the originals of the dropped segments too.
    lengths = [int(length) for (length,) in tshark(capture, "frame", "frame.len")]
    assert lengths and max(lengths) <= ETHERNET_MTU_FRAME
    # tshark calls a resent segment "out-of-order" instead of a retransmission when it follows the
    # previous segment of its direction by less than the initial RTT (its ooo threshold): here a
    # capture next to the sender sees a resend in the middle of a burst that way.
    retransmitted = tshark(capture, "tcp.analysis.retransmission", "tcp.srcport", "tcp.seq")
    resent = tshark(capture, "tcp.analysis.retransmission || tcp.analysis.out_of_order", "tcp.srcport", "tcp.seq")
    assert {drop["seq"] for drop in dropped} <= {int(seq) for port, seq in resent if port == "80"}, (dropped, resent)
    if dropped:
        assert retransmitted and all(port == "80" for port, _seq in resent), resent
    else:
        assert resent == []

    # Server side: SYN in, SYN-ACK out, then the client's ACK one full round trip through the forwarder later.
    initial_rtts = {stream: float(rtt) for stream, rtt in
                    tshark(capture, "tcp.analysis.initial_rtt", "tcp.stream", "tcp.analysis.initial_rtt")}
    assert len(initial_rtts) == 1, initial_rtts
    (initial_rtt,) = initial_rtts.values()
    assert 2 * DELAY <= initial_rtt < 2 * DELAY + SLACK
