"""Read the PromQL queries of a Grafana dashboard, ready to send to Prometheus.

Shared by the stack-file checks and the integration test that evaluates every panel query
against a real Prometheus.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

# What each Grafana variable stands for when a query is sent outside Grafana: the template
# variables match everything, the interval variables take values a 15s scrape interval gives.
VARIABLE_VALUES = {
    "instance": ".*",
    "job": ".*",
    "client": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}

# Grafana's three variable syntaxes: ${name} or ${name:format}, [[name]] or [[name:format]], $name.
# A `$` not followed by a name (a regex anchor such as "foo$") is no variable.
_VARIABLE = re.compile(
    r"\$\{(?P<braced>\w+)(?::[^}]*)?\}|\[\[(?P<bracketed>\w+)(?::[^\]]*)?\]\]|\$(?P<plain>[A-Za-z_]\w*)"
)


def iter_panels(dashboard: dict) -> Iterator[dict]:
    """Yield every panel, rows included, descending into the panels a collapsed row holds."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from iter_panels(panel)


def substitute_variables(expr: str) -> str:
    """Replace Grafana variables by the values in VARIABLE_VALUES; raise on an unknown one."""

    def replace(match: re.Match) -> str:
        name = match.group("braced") or match.group("bracketed") or match.group("plain")
        try:
            return VARIABLE_VALUES[name]
        except KeyError:
            raise ValueError(f"unknown Grafana variable ${name} in query: {expr}") from None

    return _VARIABLE.sub(replace, expr)


def panel_queries(dashboard_path: str | Path) -> list[tuple[str, str]]:
    """Return (panel title, PromQL expression with Grafana variables substituted) per query."""
    dashboard = json.loads(Path(dashboard_path).read_text(encoding="utf-8"))
    queries = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr:
                queries.append((panel.get("title", ""), substitute_variables(expr)))
    return queries
