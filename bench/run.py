"""The benchmark: offline speed against the seed-style Scapy baseline and against tcpdump, live capture on
a veth pair, CPU per frame at fixed rates, a sustained top-speed flood, idle memory, and API latency
with 500 tracked clients, on friendly and on worst-case traffic. Writes bench/RESULTS.md.

usage: sudo .venv/bin/python -m bench.run [--quick] [--out bench/RESULTS.md]
Live parts need root, iproute2, tcpreplay and tcpdump; without them they are reported as skipped.
Traffic stays on a veth pair between two network namespaces this script creates and removes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
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
from typing import Optional, Sequence

from bench.generate import (FRAMES, SERVER_V4, SERVER_V6, WORST_CASE_FRAMES, WORST_CASE_MIX, write_pcap,
                            write_worst_case_pcap)

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ["--server-ip", SERVER_V4, "--server-ip", SERVER_V6]
SUMMARIZE = [sys.executable, "-m", "exporter", "summarize", "--format", "json", *SERVERS]
# What the counting engine logs at debug level once it has read a file (absent before the engine has a slow path).
SLOW_PATH_LINE = re.compile(r"slow path: (\d+) of (\d+) frames")
# A rate no veth pair here reaches: the sustained replay loops the file this fast at most, so its
# --duration, not the loop count, is what ends it.
SUSTAINED_RATE_CEILING = 5_000_000
KERNEL_DROPS = ("traffic_exporter_kernel_dropped_packets_total", ())
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
        result = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                timeout=3600)
        times.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return statistics.median(times)


def summarize_times(one_frame: Path, pcap: Path, repeat: int, flags: Sequence[str] = ()) -> tuple[float, float]:
    """(start-up, whole run) of `summarize`, in seconds: the median runs on one frame and on ``pcap``."""
    command = [*SUMMARIZE, "--log-level", "warning", *flags]
    return timed([*command, str(one_frame)], repeat), timed([*command, str(pcap)], repeat)


def frames_per_second(frames: int, seconds: float) -> Optional[float]:
    """``frames / seconds``, or None when start-up noise swallowed the counting (``seconds`` not positive)."""
    return frames / seconds if seconds > 0 else None


def rate_cell(rate: Optional[float]) -> str:
    return f"{rate:,.0f} frames/s" if rate is not None else "not measurable: the run took no longer than start-up"


def offline(pcap: Path, frames: int, baseline_frames: int, work: Path, repeat: int) -> list[str]:
    """Frames per second of `summarize` (start-up subtracted) and of the seed-style baseline."""
    one = work / "one.pcap"
    write_pcap(str(one), 1)
    subset = work / "subset.pcap"
    write_pcap(str(subset), baseline_frames)
    startup, total = summarize_times(one, pcap, repeat)
    ours = frames_per_second(frames, total - startup)
    baseline_times = [float(subprocess.run([sys.executable, "-c", BASELINE, str(subset)], check=True,
                                           capture_output=True, text=True, timeout=3600).stdout)
                      for _ in range(repeat)]
    theirs = baseline_frames / statistics.median(baseline_times)
    return [
        "| measure | value |", "|---|---|",
        f"| `summarize`, {frames:,} frames (start-up {startup:.2f} s subtracted) | {rate_cell(ours)} |",
        f"| seed-style `sniff(prn=...)` baseline, first {baseline_frames:,} frames of the same generator | "
        f"{theirs:,.0f} frames/s |",
        f"| **ratio** | **{f'{ours / theirs:.0f}x' if ours else 'n/a'}** (target >= 150x) |",
    ]


def offline_worst_case(pcap: Path, frames: int, work: Path, repeat: int) -> list[str]:
    """`summarize` frames/s on the worst-case file, and its time against `tcpdump -r FILE -w /dev/null`."""
    one = work / "one-worst-case.pcap"
    write_worst_case_pcap(str(one), 1)
    startup, total = summarize_times(one, pcap, repeat)
    startup_off, total_off = summarize_times(one, pcap, repeat, ["--tcp-health", "off"])
    on, off = total - startup, total_off - startup_off
    cost = f"TCP health costs {on / off:.2f}x the time" if on > 0 and off > 0 else "TCP health's cost not measurable"
    rows = ["| measure | value |", "|---|---|",
            f"| `summarize`, {frames:,} worst-case frames (start-up {startup:.2f} s subtracted, median of {repeat}) "
            f"| {rate_cell(frames_per_second(frames, on))} |",
            f"| the same with `--tcp-health off` (start-up {startup_off:.2f} s subtracted) "
            f"| {rate_cell(frames_per_second(frames, off))} ({cost}) |"]
    if shutil.which("tcpdump") is None:
        return rows + ["| `tcpdump -r FILE -w /dev/null` | skipped: tcpdump is not installed |"]
    reference = timed(["tcpdump", "-r", str(pcap), "-w", "/dev/null"], repeat)
    return rows + [
        f"| `tcpdump -r FILE -w /dev/null`, same file (median of {repeat}) | {reference:.2f} s "
        f"({frames / reference:,.0f} frames/s) |",
        f"| **`summarize` time / `tcpdump` time** | **{total / reference:.1f}x** ({total:.2f} s / {reference:.2f} s, "
        f"whole runs; start-up subtracted: {(total - startup) / reference:.1f}x) |",
    ]


def slow_path_share(stderr: str) -> str:
    """'N of M (x%)' from the last `slow path: N of M frames` line of a debug log, or 'n/a' without one."""
    matches = SLOW_PATH_LINE.findall(stderr)
    if not matches:
        return "n/a"
    slow, total = (int(number) for number in matches[-1])
    return f"{slow:,} of {total:,} ({slow / total:.2%})" if total else f"{slow:,} of 0"


def slow_path(pcaps: dict[str, Path]) -> list[str]:
    """Per pcap, the share of frames the engine counted on its slow path, from `summarize --log-level debug`."""
    rows = ["| pcap | frames on the slow path |", "|---|---|"]
    for name, pcap in pcaps.items():
        result = subprocess.run([*SUMMARIZE, "--log-level", "debug", str(pcap)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(f"summarize {pcap} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        rows.append(f"| {name} | {slow_path_share(result.stderr)} |")
    return rows + ["", "From the last `slow path: N of M frames` line of `summarize --log-level debug`; n/a: it logged "
                       "none (an engine without a slow path)."]


def api_latency(pcap: Path, repeat: int) -> list[str]:
    """/metrics scrape and /traffic latency once a replay has filled the client table (500 clients)."""
    from testkit.process import get, running_exporter

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


def memory_mib(pid: int) -> dict[str, float]:
    """The Vm*/Rss* lines of /proc/PID/status, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name.startswith(("Vm", "Rss")) and value.strip().endswith("kB"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def replay(pair, pcap: Path, rate: str, options: Sequence[str] = (), timeout: float = 900) -> tuple[int, float]:
    """tcpreplay from the client end; returns (frames sent, seconds)."""
    speed = ["--topspeed"] if rate == "top" else [f"--pps={rate}"]
    result = pair.client("tcpreplay", "-q", "-i", pair.client_link, *speed, *options, str(pcap), timeout=timeout)
    sent = int(re.search(r"Successful packets:\s+(\d+)", result.stdout).group(1))
    seconds = float(re.search(r"Actual: \d+ packets \(\d+ bytes\) sent in ([\d.]+) seconds", result.stdout).group(1))
    return sent, seconds


def replay_cpu(pair, exporter, pcap: Path, rate: str, options: Sequence[str] = (),
               timeout: float = 900) -> tuple[int, float, float]:
    """Replay at ``rate``: (frames sent, seconds, the exporter's CPU seconds counting them).

    The CPU time runs until the exporter is idle again (what the ring held is counted too), so a
    share (CPU seconds / seconds) above 100% says how far one core fell behind the replay.
    """
    from exporter.ring import RING_RETIRE_MS

    pid = exporter.process.pid
    cpu_before = cpu_seconds(pid)
    sent, seconds = replay(pair, pcap, rate, options, timeout)
    time.sleep(RING_RETIRE_MS / 1000)  # the last ring block is handed over
    used, deadline = cpu_seconds(pid), time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
        previous, used = used, cpu_seconds(pid)
        if used == previous:
            break
    return sent, seconds, used - cpu_before


def frames_seen(before: dict, after: dict) -> float:
    """Frames the exporter read between two /metrics samples, whatever their result (counted, not_server...)."""
    return sum(value - before.get(key, 0) for key, value in after.items()
               if key[0] == "traffic_exporter_packets_total")


def live_exporter(pair, *flags: str):
    """The exporter capturing on the server end of ``pair``, ready."""
    from testkit.live_traffic import NamespacedExporter

    exporter = NamespacedExporter(pair, ["--interface", pair.server_link, *SERVERS, *flags])
    try:
        exporter.wait_ready()
    except BaseException:
        exporter.stop()
        raise
    return exporter


def replays_at_rates(pcap: Path, rates: Sequence[str], repeat: int,
                     flags: Sequence[str] = ()) -> dict[str, list[tuple[int, float, float]]]:
    """``repeat`` replay_cpu runs per rate, one exporter (with ``flags``) for all, each once the previous is counted."""
    from testkit.netns import namespace_pair

    runs: dict[str, list[tuple[int, float, float]]] = {rate: [] for rate in rates}
    with namespace_pair() as pair:
        exporter = live_exporter(pair, "--log-level", "warning", *flags)
        try:
            for rate in rates:
                for _ in range(repeat):
                    runs[rate].append(replay_cpu(pair, exporter, pcap, rate))
                    exporter.wait_quiet(timeout=120)
        finally:
            exporter.stop()
    return runs


def cpu_share(pcap: Path, frames: int, rate: str, repeat: int) -> list[str]:
    """The exporter's CPU share of one core at a fixed rate: median of ``repeat`` replays."""
    shares = [cpu / seconds for _sent, seconds, cpu in replays_at_rates(pcap, [rate], repeat)[rate]]
    each = ", ".join(f"{share:.0%}" for share in shares)
    return ["| measure | value |", "|---|---|",
            f"| exporter CPU at {int(rate):,} frames/s, share of one core (median of {repeat} replays of "
            f"{frames:,} frames: {each}) | **{statistics.median(shares):.0%}** (target <= 25%) |"]


# Exporters the live CPU-per-frame rows compare: name -> flags
LIVE_VARIANTS = {"af_packet": [], "af_packet, --tcp-health off": ["--tcp-health", "off"],
                 "libpcap": ["--capture-backend", "libpcap"]}


def cpu_per_frame(pcap: Path, frames: int, rates: Sequence[str], repeat: int) -> list[str]:
    """Exporter CPU per frame and share of one core at fixed rates, per LIVE_VARIANTS: medians of ``repeat``."""
    rows = ["| backend | rate (frames/s) | exporter CPU per frame | share of one core | replays (share each) |",
            "|---|---|---|---|---|"]
    for backend, flags in LIVE_VARIANTS.items():
        for rate, runs in replays_at_rates(pcap, rates, repeat, flags).items():
            shares = [cpu / seconds for _sent, seconds, cpu in runs]
            micros = [cpu / sent * 1e6 for sent, _seconds, cpu in runs]
            achieved = statistics.median(sent / seconds for sent, seconds, _cpu in runs)
            rows.append(f"| {backend} | {int(rate):,} ({achieved:,.0f} achieved) | **{statistics.median(micros):.2f} µs** "
                        f"| **{statistics.median(shares):.0%}** | {len(runs)} × {frames:,} frames: "
                        f"{', '.join(f'{share:.0%}' for share in shares)} |")
    return rows + ["", "CPU per frame: the exporter's CPU time until idle again divided by the frames sent; "
                       "share: the same time divided by the replay's duration. af_packet: the TPACKET_V3 ring; "
                       "libpcap: --capture-backend libpcap (as on macOS, the BSDs and Windows). TCP health is on "
                       "(the default) unless the row says otherwise."]


def sustained(pcap: Path, frames: int, seconds: int) -> list[str]:
    """``tcpreplay --topspeed --preload-pcap --loop`` for ``seconds``, into the exporter with its default ring."""
    from testkit.netns import namespace_pair

    loops = math.ceil(seconds * SUSTAINED_RATE_CEILING / frames)
    options = ["--preload-pcap", f"--loop={loops}", f"--duration={seconds}"]
    with namespace_pair() as pair:
        exporter = live_exporter(pair, "--log-level", "warning")
        try:
            before = exporter.metrics()
            sent, took, cpu = replay_cpu(pair, exporter, pcap, "top", options, timeout=seconds + 600)
            exporter.wait_quiet(timeout=120)
            after = exporter.metrics()
            peak = memory_mib(exporter.process.pid)["VmHWM"]
        finally:
            exporter.stop()
    drops = after.get(KERNEL_DROPS, 0) - before.get(KERNEL_DROPS, 0)
    return ["| sent | achieved rate | exporter counted / sent | exporter kernel drops | exporter CPU share "
            "| exporter peak RSS |", "|---|---|---|---|---|---|",
            f"| {sent:,} in {took:.1f} s | {sent / took:,.0f} frames/s | {frames_seen(before, after) / sent:.4f} "
            f"| {drops:,.0f} ({drops / sent:.1%}) | {cpu / took:.0%} | {peak:.0f} MiB |",
            "", f"`tcpreplay --topspeed --preload-pcap --loop={loops} --duration={seconds}` of the {frames:,}-frame "
                "worst-case file; the exporter with its default flags (ring included). CPU share: its CPU time "
                "until idle again divided by the replay's duration."]


def idle_memory(settle: float) -> list[str]:
    """The exporter's resident memory, live on the veth with default flags, ``settle`` seconds after it is up."""
    from testkit.netns import namespace_pair

    with namespace_pair() as pair:
        exporter = live_exporter(pair)
        try:
            time.sleep(settle)
            memory = memory_mib(exporter.process.pid)
        finally:
            exporter.stop()
    return ["| measure | value |", "|---|---|",
            f"| exporter VmRSS, idle on the veth with default flags, {settle:.0f} s after capture_up "
            f"| **{memory['VmRSS']:.1f} MiB** (target <= 96 MiB) |",
            f"| of which anonymous / file / shared memory | {memory['RssAnon']:.1f} / {memory['RssFile']:.1f} / "
            f"{memory['RssShmem']:.1f} MiB |"]


def live(pcap: Path, rates: list[str], exporter_args: Sequence[str] = ()) -> list[str]:
    """Exporter and tcpdump on the server end of a veth pair while tcpreplay sends the pcap."""
    from testkit.live_traffic import Tcpdump
    from testkit.netns import namespace_pair

    rows = ["| rate (frames/s) | sent | exporter counted / sent | exporter kernel drops | exporter CPU (time / replay time) "
            "| tcpdump captured / sent | tcpdump kernel drops |", "|---|---|---|---|---|---|---|"]
    with namespace_pair() as pair:
        for rate in rates:
            exporter = live_exporter(pair, "--log-level", "warning", *exporter_args)
            try:
                before = exporter.metrics()
                sent, seconds, cpu = replay_cpu(pair, exporter, pcap, rate)
                exporter.wait_quiet(timeout=120)
                after = exporter.metrics()
            finally:
                exporter.stop()
            drops = after.get(KERNEL_DROPS, 0)
            with tempfile.TemporaryDirectory() as directory:
                tcpdump = Tcpdump(pair, Path(directory) / "ref.pcap", options=["-s", "96"])
                tcpdump_sent, _ = replay(pair, pcap, rate)
                summary = tcpdump.stop()
            captured = int(re.search(r"(\d+) packets? captured", summary).group(1))
            tcpdump_drops = int(re.search(r"(\d+) packets? dropped by kernel", summary).group(1))
            rows.append(f"| {rate} ({sent / seconds:,.0f} achieved) | {sent:,} "
                        f"| {frames_seen(before, after) / sent:.4f} | {drops:.0f} | {cpu / seconds:.0%} "
                        f"| {captured / tcpdump_sent:.4f} | {tcpdump_drops} |")
    return rows + ["", "Exporter CPU: the CPU time it used until idle again (all frames counted) divided by the "
                       "replay's duration; above 100%, the ring held what one core could not count as it came."]


def machine() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return [f"- {os.cpu_count()} cores, {cpu}, {memory} GiB memory, Linux {platform.release()}",
            f"- Python {platform.python_version()}, run {datetime.datetime.now().isoformat(timespec='minutes')}, "
            f"load average at start {load_average()}"]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on a small machine makes every number here noisy."""
    return ", ".join(f"{average:.1f}" for average in os.getloadavg())


def skipped_or(reason: Optional[str], rows) -> list[str]:
    """``rows()`` when the live parts can run, else one line saying why not."""
    return [f"skipped: {reason}"] if reason else rows()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition (CI keeps it working)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args()
    # frames (friendly, worst case, baseline), repeats, seconds of sustained flood, seconds idle before reading memory
    sizes = (20_000, 20_000, 2_000, 1, 5, 2) if args.quick else (FRAMES, WORST_CASE_FRAMES, 20_000, 3, 60, 5)
    frames, worst_frames, baseline_frames, repeat, flood_seconds, settle = sizes
    rates = ["top"] if args.quick else ["top", "50000", "100000", "200000", "300000"]
    lines = ["# Benchmark results", "", *machine(), "",
             f"Command: `{' '.join(['python', '-m', 'bench.run', *sys.argv[1:]])}`", ""]
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        pcap = work / "bench.pcap"
        write_pcap(str(pcap), frames)
        worst = work / "worst-case.pcap"
        write_worst_case_pcap(str(worst), worst_frames)
        lines += ["## Offline (pcap file)", "", *offline(pcap, frames, baseline_frames, work, repeat), ""]
        lines += ["## Offline, worst-case traffic (pcap file)", "",
                  f"`python -m bench.generate --worst-case`: {WORST_CASE_MIX}.", "",
                  *offline_worst_case(worst, worst_frames, work, repeat), ""]
        lines += ["## Slow path share per pcap (`summarize --log-level debug`)", "",
                  *slow_path({f"friendly, {frames:,} frames": pcap, f"worst case, {worst_frames:,} frames": worst}), ""]
        lines += ["## API latency after a replay", "", *api_latency(pcap, repeat), ""]
        reason = live_unavailable()
        lines += ["## Live capture on a veth pair (tcpreplay -> exporter | tcpdump)", ""]
        lines += skipped_or(reason, lambda: live(pcap, rates))
        lines += ["", "## CPU at a fixed rate (live, same setup)", ""]
        lines += skipped_or(reason, lambda: cpu_share(pcap, frames, "50000", repeat))
        lines += ["", "## CPU per frame, worst-case traffic (live, same setup)", ""]
        lines += skipped_or(reason, lambda: cpu_per_frame(worst, worst_frames, ["50000", "100000"], repeat))
        lines += ["", f"## Sustained worst-case traffic at top speed for {flood_seconds} s (live, same setup)", ""]
        lines += skipped_or(reason, lambda: sustained(worst, worst_frames, flood_seconds))
        lines += ["", "## Idle resident memory (live, default flags)", ""]
        lines += skipped_or(reason, lambda: idle_memory(settle))
    lines += ["", f"Load average at the end: {load_average()}."]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
