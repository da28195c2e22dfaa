"""Command line: ``python -m exporter [serve] [flags]`` and ``python -m exporter summarize FILE``.

This is the composition root: the only place that wires capture, tally, collector and the REST API.

Exit status: 0 after SIGTERM/SIGINT; 2 when start-up is refused with one line on stderr (an invalid
flag, an unknown interface or no default route, an invalid --filter, no capture privilege
(CAP_NET_RAW), an unknown --user); 1 when a source cannot be read (e.g. a corrupt pcap).
Once started, live capture never exits on capture errors: it reports them and restarts.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import signal
import sys
from typing import Optional, Sequence

from .capture import Capture
from .classify import ServerSet, protocol_labels
from .config import SUMMARIZE_OPTIONS, Config, ConfigError, parse_config
from .engine import ClientGrouping, FrameCounter
from .live import (CapturePermissionError, FanoutError, FilterError, InterfaceNotFound, LiveSource,
                   default_interface, drop_privileges, server_addresses)
from .persistence import PeriodicSaver, restore
from .sources import PcapSource, SourceError
from .summarize import format_json, format_table, most_frequent_address, summarize
from .tally import Tally
from .webauth import BasicAuthMiddleware, load_web_config

log = logging.getLogger("exporter")
PROG = "traffic-exporter"
SUMMARIZE_MAX_CLIENTS = 1_000_000  # offline analysis lists every client unless told otherwise


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("serve", "summarize") else "serve"
    try:
        if command == "summarize":
            config = parse_config(argv, SUMMARIZE_OPTIONS, positional="file", prog=f"{PROG} summarize",
                                  defaults={"max_clients": SUMMARIZE_MAX_CLIENTS})
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
    except KeyboardInterrupt:  # Ctrl-C during start-up or a summarize run
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


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


def _open_live(config: Config) -> tuple[LiveSource, ServerSet]:
    """Open the capture socket and pick the server addresses; start-up problems become ConfigError."""
    try:
        interface = config.interface or default_interface()
    except InterfaceNotFound as error:
        raise ConfigError(f"--interface: {error}") from None
    try:
        source = LiveSource(interface, config.filter, ring_bytes=config.capture_buffer_mib << 20,
                            fanout_group=config.fanout_group)
    except FilterError as error:
        raise ConfigError(f"--filter: {error}") from None
    except FanoutError as error:
        raise ConfigError(f"--fanout-group: {error}") from None
    except InterfaceNotFound as error:
        raise ConfigError(f"--interface: {error}") from None
    except CapturePermissionError as error:
        raise ConfigError(str(error)) from None
    if config.server_ips:
        servers = ServerSet(config.server_ips)
    else:
        servers = ServerSet(server_addresses(interface))
        if not servers:
            raise ConfigError(f"--server-ip: {interface} has no IPv4 or global IPv6 address to count traffic for; "
                              f"give --server-ip")
    log.info("live capture on %s%s, server addresses %s%s", interface,
             "" if config.interface else " (holds the default route)", ", ".join(servers.addresses),
             "" if config.server_ips else f" (those of {interface})")
    return source, servers


def _counting(config: Config, servers: ServerSet, *, idle_seconds: Optional[float] = None
              ) -> tuple[FrameCounter, Tally]:
    """The counting engine and the tally it feeds."""
    grouping = ClientGrouping(config.client_prefix_v4, config.client_prefix_v6)
    labels = protocol_labels(config.port_labels)
    counter = FrameCounter(servers, config.port_labels, labels, grouping)
    tally = Tally(max_clients=config.max_clients, grouping=grouping, labels=labels,
                  client_idle_seconds=config.client_idle_seconds if idle_seconds is None else idle_seconds)
    return counter, tally


def run_summarize(config: Config) -> int:
    """Count a capture file at full speed and print the result."""
    source = PcapSource(config.pcap)
    servers = _servers_for_pcap(config, source)
    summary = summarize(source, *_counting(config, servers, idle_seconds=float("inf")))
    if config.output_format == "json":
        print(format_json(summary))
    else:
        print(format_table(summary))
    return 0


def run_serve(config: Config) -> int:
    """Capture (or replay) and serve /metrics and the REST API until SIGTERM/SIGINT."""
    from prometheus_client import make_wsgi_app
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    from compat_api.app import create_app
    from compat_api.history import History

    from .collector import build_registry
    from .demo import demo_config
    from .httpserver import create_server

    if config.demo:
        config = demo_config(config)
    if config.user and config.pcap:
        raise ConfigError("--user: only applies to live capture (a pcap replay needs no privileges)")
    if config.fanout_group is not None and config.pcap:
        raise ConfigError("--fanout-group: only applies to live capture")
    if config.user and os.geteuid() != 0:
        raise ConfigError("--user: switching users needs root; start as root or leave --user out")
    if config.pcap:
        source = PcapSource(config.pcap, realtime=config.replay_speed == "realtime", loop=config.loop)
        servers = _servers_for_pcap(config, source)
        open_source = lambda: source  # noqa: E731
    else:
        source, servers = _open_live(config)
        open_source = source.open  # reopens the socket after an error (interface gone, then back)
    config = dataclasses.replace(config, server_ips=servers.addresses)
    counter, tally = _counting(config, servers)
    tally.status.source, tally.status.interface, tally.status.filter = source.kind, source.name, config.filter
    capture = Capture(open_source, tally, counter, restart_on_error=source.kind == "live")
    history = History(tally, config.history_seconds)
    app = DispatcherMiddleware(create_app(history, config),
                               {"/metrics": make_wsgi_app(build_registry(tally))})
    if config.web_config:
        app = BasicAuthMiddleware(app, load_web_config(config.web_config))
    saver = _state_saver(config, tally, history)
    try:
        server = create_server(app, config.listen_host, config.listen_port, ident=PROG,
                               max_connections=config.web_max_connections,
                               request_timeout=config.web_request_timeout, idle_timeout=config.web_idle_timeout)
    except OSError as error:
        raise ConfigError(f"--listen: cannot listen on {config.listen}: {error.strerror}") from None

    def shut_down(signum, _frame):
        # Further signals are ignored: they would interrupt the stopping below and its final state save
        # or, as Python exits and restores the default handlers, kill the process instead of exiting with 0.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log.info("received %s, shutting down (further signals are ignored)", signal.Signals(signum).name)
        raise SystemExit(0)

    if config.user:
        # Late on purpose: the capture and listening sockets are open. The capture thread, started
        # below from this thread, inherits CAP_NET_RAW; waitress's workers, already running, keep none.
        try:
            kept = drop_privileges(config.user)
        except OSError as error:
            raise ConfigError(f"--user: cannot switch to {config.user}: {error.strerror}") from None
        log.info("switched to user %s%s", config.user, " keeping only CAP_NET_RAW" if kept else "")
    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    # The start-up objects (Scapy, Flask, ...) are kept for good: out of the collector's full scans,
    # which otherwise took about a third of the capture thread's time at 50k frames/s.
    gc.freeze()
    capture.start()
    history.start()
    if saver:
        saver.start()
    log.info("capturing %s:%s for servers %s; serving http://%s/metrics and the REST API",
             source.kind, source.name, ", ".join(servers.addresses), config.listen)
    try:
        server.run()
    except SystemExit:
        pass
    finally:
        capture.stop()
        history.stop()
        if saver:
            saver.stop()
        server.close()
    return 0


def _state_saver(config: Config, tally: Tally, history) -> Optional[PeriodicSaver]:
    """Restore ``--state-file`` into the tally and history; return the saver that keeps it current."""
    if not config.state_file:
        return None
    directory = os.path.dirname(os.path.abspath(config.state_file))
    if not os.access(directory, os.W_OK):
        raise ConfigError(f"--state-file: cannot write in {directory}; pick a writable directory")
    restore(config.state_file, {"tally": tally.prepare_restore, "history": history.prepare_restore})
    return PeriodicSaver(config.state_file, lambda: {"tally": tally.export_state(), "history": history.export_state()})
