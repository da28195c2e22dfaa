"""Command line: ``python -m exporter [serve] [flags]`` and ``python -m exporter summarize FILE|-``.

Exit status: 0 after SIGTERM/SIGINT; 2 when start-up is refused with one line on stderr (an invalid
flag, an unknown interface or no default route, an invalid --filter, no capture privilege
(CAP_NET_RAW), an unknown --user); 1 when a source cannot be read (e.g. a corrupt pcap).
Once started, live capture never exits on capture errors: it reports them and restarts.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

from .config import Config, ConfigError, serve_config, summarize_config
from .frames import SourceError

PROG = "traffic-exporter"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("serve", "summarize") else "serve"
    try:
        if command == "summarize":
            config = summarize_config(argv, prog=f"{PROG} summarize")
            _setup_logging(config)
            return run_summarize(config)
        config = serve_config(argv, prog=PROG)
        _setup_logging(config)
        from .serve import run_serve  # the HTTP stack only for serving

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


def run_summarize(config: Config) -> int:
    """Count a capture file at full speed (a stream as it arrives) and print the result.

    On a terminal, stderr shows the progress of work that takes more than a second (not with --format json).
    """
    from .progress import progress_on
    from .startup import client_facts, counting, open_source
    from .summarize import format_json, format_table, summarize

    facts = client_facts(config)
    capturing = open_source(config)
    progress = progress_on(sys.stderr, capturing.source.size) if config.output_format == "table" else None
    counter, tally = counting(config, capturing.servers, idle_seconds=float("inf"), facts=facts)
    known = facts.known if facts.geo or facts.names else None
    if facts.names is not None:
        facts.names.start()  # resolves while the file is counted
    try:
        summary = summarize(capturing.source, counter, tally, progress, known, facts.names)
    finally:
        if facts.names is not None:
            facts.names.stop()
    print(format_json(summary) if config.output_format == "json" else format_table(summary))
    return 0


def _setup_logging(config: Config) -> None:
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
