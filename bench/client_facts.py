"""What knowing the clients costs: CPU per frame of the worst case with --geoip-db and --resolve-names, or without.

usage (root): python -m bench.client_facts [--frames N] [--rounds R]

Writes a worst-case pcap (``bench.generate``), an ASN and a country database covering its clients
(mmdb-writer, a test dependency) and a hosts file naming all 2,000 clients, then runs everything
inside a network namespace whose /etc/hosts is that file and whose resolver points at 127.0.0.1,
so no PTR query leaves the namespace. Two measures, runs interleaved, medians:

- counting: process CPU (every thread, the resolver's included) per frame while ``FrameCounter``
  and ``Tally`` count the file, in one process per run;
- whole run: CPU of ``python -m exporter summarize FILE`` (start-up, counting, report; with names,
  the resolver's queries and its wait of at most 30 s for the names still asked for).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.generate import CLIENTS, SERVER_V4, SERVER_V6, client_address, write_worst_case_pcap

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"plain": [], "geoip+names": ["--geoip-db", "{dbs}", "--resolve-names"],
            "client-by asn": ["--geoip-db", "{dbs}", "--client-by", "asn"]}
ASNS = {"10.0.0.0/8": {"autonomous_system_number": 64500, "autonomous_system_organization": "Ten"},
        "10.99.0.0/16": {"autonomous_system_number": 64501, "autonomous_system_organization": "Bench"},
        "10.99.4.0/22": {"autonomous_system_number": 64502},
        "fd00::/8": {"autonomous_system_number": 64503, "autonomous_system_organization": "Six"}}
COUNTRIES = {"10.0.0.0/8": {"country": {"iso_code": "DE"}}, "10.99.2.0/23": {"country": {"iso_code": "FR"}},
             "fd00::/8": {"country": {"iso_code": "NL"}}}


def counting_cpu(pcap: str, flags: list[str]) -> float:
    """Process CPU per frame (ns) of counting ``pcap`` with ``flags``, as summarize's start-up builds it."""
    from exporter.config import summarize_config
    from exporter.startup import client_facts, counting, open_source

    config = summarize_config([pcap, "--server-ip", SERVER_V4, "--server-ip", SERVER_V6, *flags])
    facts = client_facts(config)
    capturing = open_source(config)
    counter, tally = counting(config, capturing.servers, idle_seconds=float("inf"), facts=facts)
    if facts.names:
        facts.names.start()
    frames = 0
    started = time.process_time()
    for batch in capturing.source.batches(threading.Event()):
        tally.record(counter.count(batch))
        frames += len(batch)
    spent = time.process_time() - started
    if facts.names:
        facts.names.stop()
    return spent / frames * 1e9


def whole_run_cpu(pcap: str, flags: list[str]) -> float:
    """CPU seconds (user + system) of one ``summarize`` run."""
    process = subprocess.Popen([sys.executable, "-m", "exporter", "summarize", pcap, "--format", "json", *flags],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(f"summarize {' '.join(flags)} failed ({status})")
    return usage.ru_utime + usage.ru_stime


def measure(pcap: str, dbs: str, rounds: int, frames: int) -> dict:
    """Inside the namespace: both measures for every variant, interleaved."""
    counting, whole = ({name: [] for name in VARIANTS} for _ in range(2))
    for _ in range(rounds):
        for name, flags in VARIANTS.items():
            flags = [flag.format(dbs=dbs) for flag in flags]
            counting[name].append(counting_cpu(pcap, flags))
            whole[name].append(whole_run_cpu(pcap, flags) / frames * 1e9)
    return {"counting": {name: statistics.median(values) for name, values in counting.items()},
            "whole run": {name: statistics.median(values) for name, values in whole.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.client_facts", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=600_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inside", nargs=2, metavar=("PCAP", "DBS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(measure(args.inside[0], args.inside[1], args.rounds, args.frames)))
        return
    from testkit.netns import namespace_hosts, namespace_pair
    from tests.geoip_databases import write_database

    with tempfile.TemporaryDirectory(prefix="bench-client-facts-") as directory, namespace_pair() as pair:
        pcap = Path(directory) / "worst.pcap"
        write_worst_case_pcap(str(pcap), args.frames)
        dbs = ",".join(str(write_database(Path(directory) / name, records, kind)) for name, records, kind in (
            ("asn.mmdb", ASNS, "GeoLite2-ASN"), ("country.mmdb", COUNTRIES, "GeoLite2-Country")))
        hosts = "127.0.0.1 localhost\n" + "".join(f"{client_address(i, CLIENTS)} client-{i}.bench.test\n"
                                                   for i in range(CLIENTS))
        with namespace_hosts(pair.server_ns, hosts):
            result = subprocess.run(pair.server_command(
                sys.executable, "-m", "bench.client_facts", "--frames", str(args.frames), "--rounds", str(args.rounds),
                "--inside", str(pcap), dbs), cwd=ROOT, capture_output=True, text=True, check=True)
    medians = json.loads(result.stdout)
    print(f"worst case, {args.frames:,} frames, median of {args.rounds} (CPU per frame, ns):")
    for measure_name, values in medians.items():
        for name, value in values.items():
            print(f"  {measure_name:9}  {name:14} {value:7.0f}  ratio {value / values['plain']:.3f}")


if __name__ == "__main__":
    main()
