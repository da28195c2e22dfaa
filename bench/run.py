"""The benchmark: offline speed against the seed-style Scapy baseline, live capture on a veth pair,
CPU share at a fixed rate, and API latency with 500 tracked clients. Writes bench/RESULTS.md.

usage: sudo .venv/bin/python -m bench.run [--quick] [--out bench/RESULTS.md]
Live parts need root, iproute2, tcpreplay and tcpdump; without them they are reported as skipped.
Traffic stays on a veth pair between two network namespaces this script creates and removes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from bench.generate import SERVER_V4, SERVER_V6, write_pcap

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ["--server-ip", SERVER_V4, "--server-ip", SERVER_V6]
BASELINE = """
import sys, time
from scapy.all import IP, IPv6, TCP, UDP, sniff
totals = {}
def handler(pkt):
    ip = pkt[IP] if IP in pkt else pkt[IPv6] if IPv6 in pkt else None
    if ip is None:
        return
    layer = pkt[TCP] if TCP in pkt else pkt[UDP] if UDP in pkt else None
    ports = (layer.sport, layer.dport) if layer is not None else (None, None)
    key = (ip.src, ip.dst, ports)
    totals[key] = totals.get(key, 0) + len(pkt)
started = time.perf_counter()
sniff(offline=sys.argv[1], prn=handler, store=False)
print(time.perf_counter() - started)
"""


def timed(argv: list[str], repeat: int) -> float:
    """Median wall time of a command, in seconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(argv, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=3600)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def offline(pcap: Path, frames: int, baseline_frames: int, work: Path, repeat: int) -> list[str]:
    """Frames per second of `summarize` (start-up subtracted) and of the seed-style baseline."""
    one = work / "one.pcap"
    write_pcap(str(one), 1)
    subset = work / "subset.pcap"
    write_pcap(str(subset), baseline_frames)
    summarize = [sys.executable, "-m", "exporter", "summarize", "--format", "json", "--log-level", "warning", *SERVERS]
    startup = timed([*summarize, str(one)], repeat)
    total = timed([*summarize, str(pcap)], repeat)
    ours = frames / (total - startup)
    baseline_times = [float(subprocess.run([sys.executable, "-c", BASELINE, str(subset)], check=True,
                                           capture_output=True, text=True, timeout=3600).stdout)
                      for _ in range(repeat)]
    theirs = baseline_frames / statistics.median(baseline_times)
    return [
        "| measure | value |", "|---|---|",
        f"| `summarize`, {frames:,} frames (start-up {startup:.2f} s subtracted) | {ours:,.0f} frames/s |",
        f"| seed-style `sniff(prn=...)` baseline, first {baseline_frames:,} frames of the same generator | "
        f"{theirs:,.0f} frames/s |",
        f"| **ratio** | **{ours / theirs:.0f}x** (target >= 150x) |",
    ]


def api_latency(pcap: Path, repeat: int) -> list[str]:
    """/metrics scrape and /traffic latency once a replay has filled the client table (500 clients)."""
    from tests.exporter_process import get, running_exporter

    rows = ["| request | median | p95 |", "|---|---|---|"]
    with running_exporter(["--pcap", str(pcap), *SERVERS, "--log-level", "warning"]) as (base, _process):
        deadline = time.monotonic() + 600
        while json.loads(get(base + "/"))["capture"]["running"]:
            if time.monotonic() > deadline:
                raise RuntimeError("replay did not finish")
            time.sleep(0.5)
        tracked = re.search(rb"^traffic_exporter_tracked_clients (\S+)$", get(base + "/metrics"), re.M).group(1)
        for path in ("/metrics", "/traffic?limit=1000", "/protocols", "/traffic_history?seconds=300"):
            times = []
            for _ in range(max(repeat * 10, 20)):
                started = time.perf_counter()
                get(base + path, timeout=30)
                times.append((time.perf_counter() - started) * 1000)
            times.sort()
            rows.append(f"| `GET {path}` ({float(tracked):.0f} tracked clients) | {statistics.median(times):.1f} ms "
                        f"| {times[int(len(times) * 0.95) - 1]:.1f} ms |")
    return rows


def live_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    missing = [tool for tool in ("ip", "tcpreplay", "tcpdump") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)}" if missing else None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def replay(pair, pcap: Path, rate: str) -> tuple[int, float]:
    """tcpreplay from the client end; returns (frames sent, seconds)."""
    speed = ["--topspeed"] if rate == "top" else [f"--pps={rate}"]
    result = pair.client("tcpreplay", "-q", "-i", pair.client_link, *speed, str(pcap), timeout=900)
    sent = int(re.search(r"Successful packets:\s+(\d+)", result.stdout).group(1))
    seconds = float(re.search(r"Actual: \d+ packets \(\d+ bytes\) sent in ([\d.]+) seconds", result.stdout).group(1))
    return sent, seconds


def replay_cpu(pair, exporter, pcap: Path, rate: str) -> tuple[int, float, float]:
    """Replay at ``rate``: (frames sent, seconds, the exporter's CPU time counting them / seconds).

    The CPU time runs until the exporter is idle again (what the ring held is counted too), so a
    share above 100% says how far one core fell behind the replay.
    """
    from exporter.live import RING_RETIRE_MS

    pid = exporter.process.pid
    cpu_before = cpu_seconds(pid)
    sent, seconds = replay(pair, pcap, rate)
    time.sleep(RING_RETIRE_MS / 1000)  # the last ring block is handed over
    used, deadline = cpu_seconds(pid), time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
        previous, used = used, cpu_seconds(pid)
        if used == previous:
            break
    return sent, seconds, (used - cpu_before) / seconds


def cpu_share(pcap: Path, frames: int, rate: str, repeat: int) -> list[str]:
    """The exporter's CPU share of one core at a fixed rate: median of ``repeat`` replays."""
    from tests.integration.live_traffic import NamespacedExporter
    from tests.integration.netns import namespace_pair

    shares = []
    with namespace_pair() as pair:
        exporter = NamespacedExporter(pair, ["--interface", pair.server_link, *SERVERS, "--log-level", "warning"])
        try:
            exporter.wait_ready()
            for _ in range(repeat):
                shares.append(replay_cpu(pair, exporter, pcap, rate)[2])
                exporter.wait_quiet(timeout=120)
        finally:
            exporter.stop()
    each = ", ".join(f"{share:.0%}" for share in shares)
    return ["| measure | value |", "|---|---|",
            f"| exporter CPU at {int(rate):,} frames/s, share of one core (median of {repeat} replays of "
            f"{frames:,} frames: {each}) | **{statistics.median(shares):.0%}** (target <= 25%) |"]


def live(pcap: Path, rates: list[str], exporter_args: Sequence[str] = ()) -> list[str]:
    """Exporter and tcpdump on the server end of a veth pair while tcpreplay sends the pcap."""
    from tests.integration.live_traffic import NamespacedExporter, Tcpdump
    from tests.integration.netns import namespace_pair

    rows = ["| rate (frames/s) | sent | exporter counted / sent | exporter kernel drops | exporter CPU (time / replay time) "
            "| tcpdump captured / sent | tcpdump kernel drops |", "|---|---|---|---|---|---|---|"]
    with namespace_pair() as pair:
        for rate in rates:
            exporter = NamespacedExporter(pair, ["--interface", pair.server_link, *SERVERS, "--log-level", "warning",
                                                 *exporter_args])
            try:
                exporter.wait_ready()
                before = exporter.metrics()
                sent, seconds, cpu = replay_cpu(pair, exporter, pcap, rate)
                exporter.wait_quiet(timeout=120)
                after = exporter.metrics()
            finally:
                exporter.stop()
            counted = sum(v - before.get(k, 0) for k, v in after.items() if k[0] == "traffic_exporter_packets_total")
            drops = after.get(("traffic_exporter_kernel_dropped_packets_total", ()), 0)
            with tempfile.TemporaryDirectory() as directory:
                tcpdump = Tcpdump(pair, Path(directory) / "ref.pcap", options=["-s", "96"])
                tcpdump_sent, _ = replay(pair, pcap, rate)
                summary = tcpdump.stop()
            captured = int(re.search(r"(\d+) packets? captured", summary).group(1))
            tcpdump_drops = int(re.search(r"(\d+) packets? dropped by kernel", summary).group(1))
            rows.append(f"| {rate} ({sent / seconds:,.0f} achieved) | {sent:,} | {counted / sent:.4f} | {drops:.0f} "
                        f"| {cpu:.0%} | {captured / tcpdump_sent:.4f} | {tcpdump_drops} |")
    return rows + ["", "Exporter CPU: the CPU time it used until idle again (all frames counted) divided by the "
                       "replay's duration; above 100%, the ring held what one core could not count as it came."]


def machine() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return [f"- {os.cpu_count()} cores, {cpu}, {memory} GiB memory, Linux {platform.release()}",
            f"- Python {platform.python_version()}, run {datetime.datetime.now().isoformat(timespec='minutes')}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition (CI keeps it working)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args()
    frames, baseline_frames, repeat = (20_000, 2_000, 1) if args.quick else (500_000, 20_000, 3)
    rates = ["top"] if args.quick else ["top", "50000", "100000", "200000", "300000"]
    lines = ["# Benchmark results", "", *machine(), "",
             f"Command: `{' '.join(['python', '-m', 'bench.run', *sys.argv[1:]])}`", ""]
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        pcap = work / "bench.pcap"
        write_pcap(str(pcap), frames)
        lines += ["## Offline (pcap file)", "", *offline(pcap, frames, baseline_frames, work, repeat), ""]
        lines += ["## API latency after a replay", "", *api_latency(pcap, repeat), ""]
        reason = live_unavailable()
        lines += ["## Live capture on a veth pair (tcpreplay -> exporter | tcpdump)", ""]
        lines += [f"skipped: {reason}"] if reason else live(pcap, rates)
        lines += ["", "## CPU at a fixed rate (live, same setup)", ""]
        lines += [f"skipped: {reason}"] if reason else cpu_share(pcap, frames, "50000", repeat)
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
