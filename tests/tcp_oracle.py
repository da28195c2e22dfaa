"""Independent oracles for TCP health: tshark's TCP analysis of a capture, and a brute-force record of byte ranges.

Shared by tests/test_tcp_oracle.py and the live capture test.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

FIELDS = ("frame.number", "frame.time_epoch", "tcp.stream", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst",
          "tcp.flags", "tcp.seq_raw", "tcp.len", "tcp.analysis.initial_rtt", "tcp.analysis.retransmission",
          "tcp.analysis.fast_retransmission", "tcp.analysis.spurious_retransmission", "tcp.analysis.keep_alive")
SYN, RST, ACK = 0x02, 0x04, 0x10


def tshark_frames(path: Path) -> list[dict]:
    """The TCP frames of a capture as tshark dissects and analyses them (outermost headers)."""
    output = subprocess.run(["tshark", "-r", str(path), "-Y", "tcp && !icmp && !icmpv6", "-T", "fields",
                             "-E", "separator=|", "-E", "occurrence=f", *sum((["-e", f] for f in FIELDS), [])],
                            capture_output=True, text=True, timeout=300, check=True).stdout
    frames = []
    for line in output.splitlines():
        values = dict(zip(FIELDS, line.split("|")))
        frames.append({"number": int(values["frame.number"]), "time": float(values["frame.time_epoch"]),
                       "stream": int(values["tcp.stream"]),
                       "src": values["ip.src"] or values["ipv6.src"], "dst": values["ip.dst"] or values["ipv6.dst"],
                       "flags": int(values["tcp.flags"], 16), "seq": int(values["tcp.seq_raw"]),
                       "length": int(values["tcp.len"]),
                       "initial_rtt": float(values["tcp.analysis.initial_rtt"] or "nan"),
                       "retransmission": any(values[f] for f in FIELDS[11:14]),
                       "keep_alive": bool(values["tcp.analysis.keep_alive"])})
    return frames


def servers_of(frames: list[dict]) -> set[str]:
    """The hosts that receive SYNs (TCP health measures connections clients open to the server)."""
    return {frame["dst"] for frame in frames if frame["flags"] & (SYN | ACK) == SYN}


def brute_force_retransmissions(frames: list[dict]) -> tuple[set[int], set[int]]:
    """(frames whose whole range was seen before, frames filling a gap below the highest byte seen).

    Unbounded: per stream and direction every range seen, sequence numbers relative to the first seen.
    """
    seen: dict[tuple, list[tuple[int, int]]] = {}
    base: dict[tuple, int] = {}
    retransmitted, gap_fillers = set(), set()
    for frame in frames:
        key = (frame["stream"], frame["src"])
        start = (frame["seq"] - base.setdefault(key, frame["seq"])) % 2**32
        if frame["flags"] & SYN:
            seen.setdefault(key, []).append((start, start + 1))
            continue
        if frame["flags"] & RST or frame["length"] == 0 or frame["keep_alive"]:
            continue
        ranges = seen.setdefault(key, [])
        end = start + frame["length"]
        covered = sum(max(0, min(end, e) - max(start, s)) for s, e in _merged(ranges))
        if covered == end - start:
            retransmitted.add(frame["number"])
        elif ranges and start < max(e for _, e in ranges):
            gap_fillers.add(frame["number"])
        ranges.append((start, end))
    return retransmitted, gap_fillers


def _merged(ranges):
    merged = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def tshark_round_trips(frames: list[dict], servers: set[str]) -> dict[int, float]:
    """ACK frame number -> initial_rtt minus (last SYN -> last SYN-ACK), for connections opened to a server."""
    by_stream: dict[int, list[dict]] = {}
    for frame in frames:
        by_stream.setdefault(frame["stream"], []).append(frame)
    found = {}
    for stream in by_stream.values():
        syn = synack = None
        for frame in stream:
            if frame["flags"] & (SYN | ACK) == SYN and frame["dst"] in servers:
                syn = frame
            elif frame["flags"] & (SYN | ACK) == SYN | ACK and syn is not None:
                synack = frame
            elif frame["initial_rtt"] == frame["initial_rtt"] and syn is not None and synack is not None:
                found[frame["number"]] = frame["initial_rtt"] - (synack["time"] - syn["time"])
                break
    return found
