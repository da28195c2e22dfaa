"""Command line: ``python -m exporter [serve] [flags]`` and ``python -m exporter summarize FILE``.

This is the composition root: the only place that wires capture, tally, collector and the REST API.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
from typing import Optional, Sequence

from .capture import Capture
from .classify import ServerSet
from .config import SUMMARIZE_OPTIONS, Config, ConfigError, parse_config
from .sources import PcapSource, SourceError
from .summarize import format_table, most_frequent_address, summarize
from .tally import Tally

log = logging.getLogger("exporter")
PROG = "traffic-exporter"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("serve", "summarize") else "serve"
    try:
        if command == "summarize":
            config = parse_config(argv, SUMMARIZE_OPTIONS, positional="file", prog=f"{PROG} summarize")
            _setup_logging(config)
            return run_summarize(config)
        config = parse_config(argv)
        _setup_logging(config)
        return run_serve(config)
    except ConfigError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    except SourceError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1


def _setup_logging(config: Config) -> None:
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _servers_for_pcap(config: Config, source: PcapSource) -> ServerSet:
    if config.server_ips:
        return ServerSet(config.server_ips)
    guessed = most_frequent_address(source)
    if guessed is None:
        log.warning("%s has no readable IP frame to guess the server from; every frame will be ignored",
                    source.name)
        return ServerSet([])
    log.info("no --server-ip given: using %s, the address seen most often in %s", guessed, source.name)
    return ServerSet([guessed])


def _tally(config: Config, *, idle_seconds: Optional[float] = None) -> Tally:
    return Tally(max_clients=config.max_clients,
                 client_idle_seconds=config.client_idle_seconds if idle_seconds is None else idle_seconds,
                 client_prefix_v4=config.client_prefix_v4, client_prefix_v6=config.client_prefix_v6)


def run_summarize(config: Config) -> int:
    """Count a capture file at full speed and print the result."""
    source = PcapSource(config.pcap)
    servers = _servers_for_pcap(config, source)
    summary = summarize(source, servers, config.port_labels, _tally(config, idle_seconds=float("inf")))
    if config.output_format == "json":
        print(json.dumps(summary, indent=1))
    else:
        print(format_table(summary))
    return 0


def run_serve(config: Config) -> int:
    """Capture (or replay) and serve /metrics and the REST API until SIGTERM/SIGINT."""
    import waitress
    from prometheus_client import make_wsgi_app
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    from compat_api.app import create_app
    from compat_api.history import History

    from .collector import build_registry

    if not config.pcap:
        raise ConfigError("--pcap: live capture is not available yet; replay a file with --pcap FILE")
    source = PcapSource(config.pcap, realtime=config.replay_speed == "realtime", loop=config.loop)
    servers = _servers_for_pcap(config, source)
    config = dataclasses.replace(config, server_ips=servers.addresses)
    tally = _tally(config)
    tally.status.source, tally.status.interface, tally.status.filter = source.kind, source.name, config.filter
    capture = Capture(lambda: source, tally, servers, config.port_labels, restart_on_error=False)
    history = History(tally, config.history_seconds)
    app = DispatcherMiddleware(create_app(history, config),
                               {"/metrics": make_wsgi_app(build_registry(tally))})
    server = waitress.create_server(app, host=config.listen_host, port=config.listen_port, threads=8,
                                    ident=PROG)

    def shut_down(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    capture.start()
    history.start()
    log.info("capturing %s:%s for servers %s; serving http://%s/metrics and the REST API",
             source.kind, source.name, ", ".join(servers.addresses), config.listen)
    try:
        server.run()
    except SystemExit:
        pass
    finally:
        capture.stop()
        history.stop()
        server.close()
    return 0
