"""One-shot offline analysis of a capture file: the same counting as serve mode, printed once."""
from __future__ import annotations

import collections
import ipaddress
import threading
from typing import Mapping, Optional

from .capture import FrameCounter
from .classify import IN, ServerSet, protocol_labels
from .decode import decode_frame
from .sources import PcapSource
from .tally import RESULTS, Tally

GUESS_FRAMES = 10000


def most_frequent_address(source: PcapSource, frames: int = GUESS_FRAMES) -> Optional[str]:
    """The IP address seen most often in the first frames' outermost IP headers, or None."""
    seen: collections.Counter = collections.Counter()
    read = 0
    for batch in source.batches(threading.Event()):
        for start, end, _wire_length in batch.spans:
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


def summarize(source: PcapSource, servers: ServerSet, port_labels: Mapping[tuple[int, int], str],
              tally: Tally) -> dict:
    """Count every frame of ``source`` into ``tally`` and return the summary report."""
    counter = FrameCounter(servers, port_labels)
    for batch in source.batches(threading.Event()):
        tally.record(*counter.count(batch))
    return report(tally, protocol_labels(port_labels), servers)


def report(tally: Tally, labels: tuple[str, ...], servers: ServerSet) -> dict:
    """The summary as a JSON-ready dict: clients by total bytes, ignored frames by reason."""
    snapshot = tally.snapshot()
    clients: dict[str, dict] = {}
    for (client, direction, protocol), (nbytes, packets) in snapshot.series.items():
        entry = clients.get(client)
        if entry is None:
            entry = clients[client] = {"ip": client, "bytes_in": 0, "bytes_out": 0, "packets_in": 0,
                                       "packets_out": 0, "total": 0, "protocols": dict.fromkeys(labels, 0)}
        suffix = "in" if direction == IN else "out"
        entry["bytes_" + suffix] += nbytes
        entry["packets_" + suffix] += packets
        entry["total"] += nbytes
        entry["protocols"][protocol] += nbytes
    ordered = sorted(clients.values(), key=lambda c: (-c["total"], c["ip"]))
    return {
        "servers": list(servers.addresses),
        "clients": ordered,
        "ignored": {reason: snapshot.results[reason] for reason in RESULTS if reason != "counted"},
        "total_bytes": sum(c["total"] for c in ordered),
        "packets": snapshot.results["counted"],
    }


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def format_table(summary: dict) -> str:
    """Aligned columns for people."""
    header = ("CLIENT", "IN", "OUT", "TOTAL", "PKTS IN", "PKTS OUT", "PROTOCOLS")
    rows = [header]
    for client in summary["clients"]:
        protocols = sorted(((b, p) for p, b in client["protocols"].items() if b), reverse=True)
        rows.append((client["ip"], human_bytes(client["bytes_in"]), human_bytes(client["bytes_out"]),
                     human_bytes(client["total"]), str(client["packets_in"]), str(client["packets_out"]),
                     " ".join(f"{p} {human_bytes(b)}" for b, p in protocols)))
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
