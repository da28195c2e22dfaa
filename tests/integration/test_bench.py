"""The benchmark keeps working: its quick mode runs end to end and writes every section."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import frames_per_second, live_unavailable, rate_cell, slow_path_share

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
HEADINGS = ("## Offline (pcap file)", "## Offline, worst-case traffic (pcap file)", "## Slow path share per pcap",
            "## API latency after a replay", "## Live capture on a veth pair", "## CPU at a fixed rate",
            "## CPU per frame, worst-case traffic", "## Sustained worst-case traffic at top speed",
            "## Idle resident memory")
# Quick mode counts so few frames that on a busy machine the run may take no longer than the start-up.
RATE = r"([\d,]+ frames/s|not measurable: the run took no longer than start-up)"


def test_quick_benchmark_writes_every_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    text = out.read_text()
    for heading in HEADINGS:
        assert heading in text
    assert "| **ratio** |" in text and "GET /metrics" in text
    assert re.search(rf"\| `summarize`, [\d,]+ worst-case frames .* \| {RATE} \|", text)
    assert re.search(rf"\| the same with `--tcp-health off` .* \| {RATE} "
                     r"\((TCP health costs [\d.]+x the time|TCP health's cost not measurable)\) \|", text)
    assert re.search(r"\| \*\*`summarize` time / `tcpdump` time\*\* \| \*\*[\d.]+x\*\*", text)
    for pcap in ("friendly", "worst case"):
        assert re.search(rf"^\| {pcap}, [\d,]+ frames \| (n/a|[\d,]+ of [\d,]+ \([\d.]+%\)) \|$", text, re.M)
    if live_unavailable():
        return
    for rate in ("50,000", "100,000"):
        for backend in ("af_packet", "af_packet, --tcp-health off", "libpcap"):
            assert re.search(rf"^\| {backend} \| {rate} \([\d,]+ achieved\) \| \*\*[\d.]+ µs\*\* "
                             rf"\| \*\*\d+%\*\* \|", text, re.M)
    assert re.search(r"^\| [\d,]+ in [\d.]+ s \| [\d,]+ frames/s \| \d\.\d{4} \| [\d,]+ \([\d.]+%\) \| \d+% "
                     r"\| \d+ MiB \|$", text, re.M)
    assert re.search(r"^\| exporter VmRSS, idle .* \| \*\*[\d.]+ MiB\*\*", text, re.M)


@pytest.mark.parametrize("stderr, share", [
    ("DEBUG exporter: read 10 batches\n", "n/a"),
    ("DEBUG slow path: 120 of 600000 frames\n", "120 of 600,000 (0.02%)"),
    ("slow path: 5 of 10 frames\nslow path: 30 of 40 frames\n", "30 of 40 (75.00%)"),
])
def test_slow_path_share_reads_the_engines_debug_line(stderr, share):
    assert slow_path_share(stderr) == share


@pytest.mark.parametrize("frames, seconds, cell", [
    (3_000_000, 2.0, "1,500,000 frames/s"),
    (20_000, 0.0, "not measurable: the run took no longer than start-up"),
    (20_000, -0.05, "not measurable: the run took no longer than start-up"),  # start-up noise exceeded the counting
])
def test_a_rate_is_frames_over_counting_seconds_unless_start_up_noise_swallowed_them(frames, seconds, cell):
    assert rate_cell(frames_per_second(frames, seconds)) == cell
