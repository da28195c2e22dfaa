"""``--demo``: replay the bundled capture in a loop at its recorded pace, so anyone sees the exporter work.

A pcap replay opens no capture socket, so the demo needs no root and no capabilities. The capture
(exporter/data/demo.pcap) is made by scripts/make_demo_pcap.py; its server addresses are below.
"""
from __future__ import annotations

from pathlib import Path
from typing import TextIO

DEMO_PCAP = Path(__file__).resolve().parent / "data" / "demo.pcap"
DEMO_SERVER_IPS = ("192.0.2.10", "2001:db8::10")


def demo_urls(host: str, port: int) -> list[str]:
    """The pages worth opening on a server listening on ``host:port``: dashboard, metrics, REST API."""
    if host in ("0.0.0.0", "::"):
        host = "localhost"  # listening on every address; the browser is most likely on this machine
    elif ":" in host:
        host = f"[{host}]"
    base = f"http://{host}:{port}"
    return [f"{base}/dashboard", f"{base}/metrics", f"{base}/traffic"]


def print_demo_urls(host: str, port: int, out: TextIO) -> None:
    """Tell a new user what is replayed and where to look."""
    dashboard, metrics, traffic = demo_urls(host, port)
    print(f"traffic-exporter demo: replaying {DEMO_PCAP.name} in a loop for servers {', '.join(DEMO_SERVER_IPS)}\n"
          f"  dashboard:          {dashboard}\n"
          f"  Prometheus metrics: {metrics}\n"
          f"  REST API:           {traffic}\n"
          f"Stop with Ctrl-C.", file=out, flush=True)
