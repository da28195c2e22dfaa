"""``serve``: capture (or replay) and serve ``/metrics`` and the REST API until SIGTERM/SIGINT.

The composition root: the only module that wires the exporter and ``compat_api`` together.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from typing import Callable, Optional

from prometheus_client import make_wsgi_app
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from compat_api.app import create_app
from compat_api.history import History

from .addresses import ServerAddresses
from .capture import Capture
from .client_info import ClientFacts
from .collector import build_registry
from .config import Config, ConfigError
from .demo import print_demo_urls
from .httpserver import BoundedServer, create_server
from .persistence import PeriodicSaver, restore
from .startup import client_facts, counting, open_source
from .tally import Tally
from .webauth import BasicAuthMiddleware, load_web_config

log = logging.getLogger("exporter")
PROG = "traffic-exporter"


def run_serve(config: Config) -> int:
    """Build, start, serve, stop; returns the exit code."""
    if config.demo:
        print_demo_urls(config.listen_host, config.listen_port, sys.stdout)
    facts = client_facts(config)
    capturing = open_source(config)
    counter, tally = counting(config, capturing.servers, facts=facts)
    capture = Capture(capturing.source, tally, counter, capture_filter=config.filter)
    servers = ServerAddresses(capturing.servers, capturing.follow, on_change=counter.set_servers)
    history = History(tally, config.history_seconds)
    saver = _restore_state(config, tally, history)
    server = _http_server(config, tally, capture, history, servers, facts)
    if config.user:
        _become(config.user)
    _stop_on_signals()
    # The start-up objects (Scapy, Flask, ...) are kept for good: out of the collector's full scans.
    gc.freeze()
    running = [capture, history, servers] + ([saver] if saver else []) + ([facts.names] if facts.names else [])
    for part in running:
        part.start()
    log.info("capturing %s for servers %s; serving http://%s/metrics and the REST API",
             capture.status().description, ", ".join(servers.addresses()), config.listen)
    try:
        server.run()
    finally:
        for part in running:
            part.stop()
        server.close()
    return 0


def _restore_state(config: Config, tally: Tally, history: History) -> Optional[PeriodicSaver]:
    """Restore ``--state-file`` into the tally and history; return the saver that keeps it current."""
    if not config.state_file:
        return None
    directory = os.path.dirname(os.path.abspath(config.state_file))
    if not os.access(directory, os.W_OK):
        raise ConfigError(f"--state-file: cannot write in {directory}; pick a writable directory")
    restore(config.state_file, {"tally": tally.prepare_restore, "history": history.prepare_restore})
    return PeriodicSaver(config.state_file, lambda: {"tally": tally.export_state(), "history": history.export_state()})


def _http_server(config: Config, tally: Tally, capture: Capture, history: History,
                 servers: ServerAddresses, facts: ClientFacts) -> BoundedServer:
    """``/metrics`` and the REST API on one listening socket, behind basic auth when configured."""
    app: Callable = DispatcherMiddleware(
        create_app(history, capture.status, servers.addresses, config.cors_origins, facts.known),
        {"/metrics": make_wsgi_app(build_registry(tally, capture.status, servers.addresses, facts))})
    if config.web_config:
        app = BasicAuthMiddleware(app, load_web_config(config.web_config))
    try:
        return create_server(app, config.listen_host, config.listen_port, ident=PROG,
                             max_connections=config.web_max_connections,
                             request_timeout=config.web_request_timeout, idle_timeout=config.web_idle_timeout)
    except OSError as error:
        raise ConfigError(f"--listen: cannot listen on {config.listen}: {error.strerror}") from None


def _become(user: str) -> None:
    """Drop root, late on purpose: the capture and listening sockets are open.

    The capture thread, started afterwards from this thread, inherits CAP_NET_RAW; waitress's
    workers, already running, keep none.
    """
    from .privileges import drop_privileges

    try:
        kept = drop_privileges(user)
    except OSError as error:
        raise ConfigError(f"--user: cannot switch to {user}: {error.strerror}") from None
    log.info("switched to user %s%s", user, " keeping only CAP_NET_RAW" if kept else "")


def _stop_on_signals() -> None:
    def shut_down(signum, _frame):
        # Further signals are ignored: they would interrupt the stopping and its final state save or,
        # as Python exits and restores the default handlers, kill the process instead of exiting with 0.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log.info("received %s, shutting down (further signals are ignored)", signal.Signals(signum).name)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
