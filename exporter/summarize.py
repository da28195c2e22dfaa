"""One-shot offline analysis of a capture file or stream: the same counting as serve mode, printed once."""
from __future__ import annotations

import collections
import ipaddress
import json
import threading
import logging
from typing import Callable, Optional

from .classify import ServerSet
from .decode import decode_frame
from .engine import FrameCounter
from .names import NameResolver
from .replay import PcapSource
from .progress import Progress, human_bytes
from .tally import RESULTS, Tally
from .tcpflows import rtt_quantile, tcp_columns

log = logging.getLogger(__name__)
NAMES_WAIT_SECONDS = 30.0  # with --resolve-names, the wait at most for names still asked for

GUESS_FRAMES = 10000


def most_frequent_address(source: PcapSource, frames: int = GUESS_FRAMES) -> Optional[str]:
    """The IP address seen most often in the first frames' outermost IP headers, or None."""
    seen: collections.Counter = collections.Counter()
    read = 0
    for batch in source.batches(threading.Event()):
        for start, end in zip(batch.starts.tolist(), batch.ends.tolist()):
            decoded = decode_frame(batch.link_type, batch.buffer, start, end)
            if decoded.__class__ is not str:
                seen[decoded[0]] += 1
                seen[decoded[1]] += 1
        read += len(batch)
        if read >= frames:
            break
    if not seen:
        return None
    return str(ipaddress.ip_address(seen.most_common(1)[0][0]))


def summarize(source: PcapSource, counter: FrameCounter, tally: Tally, progress: Optional[Progress] = None,
              client_facts: Optional[Callable[[str], dict]] = None, names: Optional[NameResolver] = None) -> dict:
    """Count every frame of ``source`` into ``tally`` and return the summary report; show ``progress`` per batch.

    With ``names`` (started), wait up to NAMES_WAIT_SECONDS for the names still asked for before reporting.
    """
    slow = frames = 0
    try:
        for batch in source.batches(threading.Event()):
            if batch:  # an empty one: a stream idles
                counts = counter.count(batch)
                tally.record(counts)
                slow += counts.slow_frames
                frames += len(batch)
            if progress is not None:
                progress.update(frames, source.bytes_read())
    finally:
        if progress is not None:
            progress.clear()
    log.debug("slow path: %d of %d frames", slow, frames)
    if names is not None:
        names.wait_idle(NAMES_WAIT_SECONDS)
    return report(tally, counter.labels, counter.servers, client_facts)


def report(tally: Tally, labels: tuple[str, ...], servers: ServerSet,
           client_facts: Optional[Callable[[str], dict]] = None) -> dict:
    """The summary as a JSON-ready dict: clients by total bytes (with what ``client_facts`` knows of them),
    ignored frames by reason."""
    snapshot = tally.snapshot()
    counts = snapshot.counts  # (client, bytes | packets, direction, label)
    by_direction = counts.sum(axis=3).tolist()
    by_label = counts[:, 0].sum(axis=1).tolist()
    clients = [{"ip": client, "bytes_in": nbytes[0], "bytes_out": nbytes[1], "packets_in": packets[0],
                "packets_out": packets[1], "total": nbytes[0] + nbytes[1], "protocols": dict(zip(labels, protocols))}
               for client, (nbytes, packets), protocols in zip(snapshot.clients, by_direction, by_label)
               if packets[0] or packets[1]]
    if snapshot.tcp is not None:
        health = {client: row for client, row in zip(snapshot.clients, snapshot.tcp)}
        for client in clients:
            client["tcp"] = tcp_health(health[client["ip"]], labels)
    clients.sort(key=lambda c: (-c["total"], c["ip"]))
    if client_facts is not None:
        for client in clients:
            client.update(client_facts(client["ip"]))
    summary = {
        "servers": list(servers.addresses),
        "clients": clients,
        "ignored": {reason: snapshot.results[reason] for reason in RESULTS if reason != "counted"},
        "total_bytes": sum(c["total"] for c in clients),
        "packets": snapshot.results["counted"],
    }
    if snapshot.tcp is not None:
        summary["tcp"] = tcp_health(snapshot.tcp_totals, labels)
    return summary


def tcp_health(row, labels: tuple[str, ...]) -> dict:
    """One client's (or all clients') TCP health sums as JSON-ready figures."""
    columns = tcp_columns(len(labels))
    pair = lambda first: {"in": int(row[first]), "out": int(row[first + 1])}  # noqa: E731
    buckets = row[columns.rtt_buckets:columns.rtt_sum_ns].tolist()
    median = rtt_quantile(0.5, buckets)
    return {"handshakes": int(row[columns.handshakes:columns.handshakes + len(labels)].sum()),
            "handshake_rtt_p50_seconds": None if median is None else round(median, 6),
            "handshake_rtt_mean_seconds": round(int(row[columns.rtt_sum_ns]) / sum(buckets) / 1e9, 6) if sum(buckets) else None,
            "segments": pair(columns.segments), "retransmitted": pair(columns.retransmitted),
            "resets": pair(columns.resets)}


def format_json(summary: dict) -> str:
    """The summary as JSON, one client per line (json's own indenting is many times slower)."""
    parts = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in summary.items() if key != "clients"]
    clients = ",\n".join(f"  {json.dumps(client)}" for client in summary["clients"])
    parts.insert(1, f' "clients": [\n{clients}\n ]' if clients else ' "clients": []')
    return "{\n" + ",\n".join(parts) + "\n}"


def _tcp_cells(health: dict) -> tuple[str, str, str]:
    """RTT P50 (ms), RETRANS (share of payload segments, both directions), RESETS (both directions)."""
    median = health["handshake_rtt_p50_seconds"]
    segments = sum(health["segments"].values())
    retransmitted = sum(health["retransmitted"].values())
    return ("-" if median is None else f"{median * 1000:.1f} ms",
            f"{100 * retransmitted / segments:.1f}%" if segments else "-", str(sum(health["resets"].values())))


def format_table(summary: dict) -> str:
    """Aligned columns for people; with TCP health, a client's median handshake round trip, its
    retransmitted share of payload segments, and resets."""
    tcp = "tcp" in summary
    header = ("CLIENT", "IN", "OUT", "TOTAL", "PKTS IN", "PKTS OUT") + (
        ("RTT P50", "RETRANS", "RESETS") if tcp else ()) + ("PROTOCOLS",)
    rows = [header]
    for client in summary["clients"]:
        protocols = sorted(((b, p) for p, b in client["protocols"].items() if b), reverse=True)
        rows.append((client["ip"] + who(client), human_bytes(client["bytes_in"]), human_bytes(client["bytes_out"]),
                     human_bytes(client["total"]), str(client["packets_in"]), str(client["packets_out"]))
                    + (_tcp_cells(client["tcp"]) if tcp else ())
                    + (" ".join(f"{p} {human_bytes(b)}" for b, p in protocols),))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:-1], widths[1:])]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
    ignored = ", ".join(f"{reason} {frames}" for reason, frames in summary["ignored"].items())
    lines.append("")
    lines.append(f"server {', '.join(summary['servers'])}: {len(summary['clients'])} clients, "
                 f"{human_bytes(summary['total_bytes'])} in {summary['packets']} frames; ignored: {ignored}")
    return "\n".join(lines)


def who(client: dict) -> str:
    """`` (host name, AS64496 organisation, country)`` of a client entry: the known fields not already its label."""
    asn = f"AS{client['asn']}" if "asn" in client else ""
    network = " ".join(part for part in (asn if asn != client["ip"] else "", client.get("as_org", "")) if part)
    country = client.get("country", "")
    known = ", ".join(part for part in (client.get("hostname", ""), network, country if country != client["ip"] else "")
                      if part)
    return f" ({known})" if known else ""
