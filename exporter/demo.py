"""``--demo``: replay the bundled capture in a loop at its recorded pace, so anyone sees the exporter work.

A pcap replay opens no capture socket, so the demo needs no root and no capabilities. The capture
(exporter/data/demo.pcap) is made by scripts/make_demo_pcap.py; its server addresses are below.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional, TextIO

from .config import Config, ConfigError

DEMO_PCAP = Path(__file__).resolve().parent / "data" / "demo.pcap"
DEMO_SERVER_IPS = ("192.0.2.10", "2001:db8::10")
# Flags that choose what to capture; the demo decides that itself.
CONFLICTS = {"pcap": "--pcap", "interface": "--interface", "server_ips": "--server-ip", "user": "--user"}


def demo_config(config: Config, out: Optional[TextIO] = None) -> Config:
    """The configuration for ``--demo``, after printing the URLs to open to ``out`` (default stdout)."""
    given = [flag for name, flag in CONFLICTS.items() if getattr(config, name)]
    if given:
        raise ConfigError(f"--demo: replays its own capture; leave out {', '.join(given)}")
    config = dataclasses.replace(config, pcap=str(DEMO_PCAP), replay_speed="realtime", loop=True,
                                 server_ips=DEMO_SERVER_IPS)
    print_demo_urls(config, sys.stdout if out is None else out)
    return config


def demo_urls(config: Config) -> list[str]:
    """The pages worth opening: the dashboard, the Prometheus metrics and the REST API."""
    host = config.listen_host
    if host in ("0.0.0.0", "::"):
        host = "localhost"  # listening on every address; the browser is most likely on this machine
    elif ":" in host:
        host = f"[{host}]"
    base = f"http://{host}:{config.listen_port}"
    return [f"{base}/dashboard", f"{base}/metrics", f"{base}/traffic"]


def print_demo_urls(config: Config, out: TextIO) -> None:
    """Tell a new user what is replayed and where to look."""
    dashboard, metrics, traffic = demo_urls(config)
    print(f"traffic-exporter demo: replaying {DEMO_PCAP.name} in a loop for servers {', '.join(DEMO_SERVER_IPS)}\n"
          f"  dashboard:          {dashboard}\n"
          f"  Prometheus metrics: {metrics}\n"
          f"  REST API:           {traffic}\n"
          f"Stop with Ctrl-C.", file=out, flush=True)
