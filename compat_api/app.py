"""The legacy REST API: ``/``, ``/traffic``, ``/protocols``, ``/traffic_history`` (docs/architecture.md).

Every view is computed from one consistent copy of the history's one-second buckets.
"""
from __future__ import annotations

import html
import json
import logging
import time
from importlib import resources
from typing import Any, Callable, Optional, Sequence

import numpy as np

from flask import Flask, Response, jsonify, request
from flask_cors import CORS
from werkzeug.exceptions import BadRequest, HTTPException

from exporter.capture import CaptureStatus
from exporter.tcpflows import rtt_quantile

from .history import ClientsView, History, SecondsView

log = logging.getLogger(__name__)

LIMIT_DEFAULT, LIMIT_MAX = 10, 1000
ClientFactsOf = Callable[[str], dict]  # client label -> known hostname, asn, as_org, country
TRAFFIC_SECONDS_DEFAULT = 300
PROTOCOLS_SECONDS_DEFAULT = 300
HISTORY_SECONDS_DEFAULT = 60
MAX_DIGITS = 9  # longer numbers are out of every range; refusing them early keeps int() cheap

# The dashboard loads its own script and style and talks only to this server.
DASHBOARD_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                 "img-src 'self' data:; base-uri 'none'; form-action 'none'")

LANDING_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>traffic-exporter</title></head>
<body><h1>traffic-exporter</h1>
<p>Counts the traffic of {servers} per client, direction and protocol.</p>
<ul>
<li><a href="metrics">/metrics</a> &mdash; Prometheus metrics</li>
<li><a href="openapi.json">/openapi.json</a> &mdash; the REST API (OpenAPI 3)</li>
<li><a href="dashboard">/dashboard</a> &mdash; dashboard</li>
</ul></body></html>
"""


def create_app(history: History, capture_status: Callable[[], CaptureStatus], servers: Callable[[], Sequence[str]],
               cors_origins: Sequence[str] = ("*",), client_facts: Optional[ClientFactsOf] = None) -> Flask:
    """Build the Flask app serving the REST API from ``history``, the capture's health and the server addresses now.

    ``client_facts(client)`` gives what is known of a client (host name, AS, country) for ``/traffic``.
    """
    app = Flask(__name__)
    app.json.sort_keys = False  # keep the documented key order
    CORS(app, origins=list(cors_origins), methods=["GET", "HEAD", "OPTIONS"])
    labels = history.labels
    history_max = history.seconds
    spec = load_openapi(history_max)

    @app.get("/")
    def index() -> Response:
        accept = request.accept_mimetypes
        if accept.best_match(["application/json", "text/html"]) == "text/html":
            response = Response(LANDING_PAGE.format(servers=html.escape(", ".join(servers()) or "the server")),
                                mimetype="text/html")
        else:
            response = jsonify(index_body(capture_status(), servers()))
        response.vary.add("Accept")
        return response

    @app.get("/traffic")
    def traffic() -> Response:
        limit = int_param("limit", LIMIT_DEFAULT, LIMIT_MAX)
        seconds = int_param("seconds", min(TRAFFIC_SECONDS_DEFAULT, history_max), history_max)
        return jsonify(traffic_body(history.clients_window(seconds), labels, limit, client_facts))

    @app.get("/protocols")
    def protocols() -> Response:
        seconds = int_param("seconds", min(PROTOCOLS_SECONDS_DEFAULT, history_max), history_max)
        return jsonify(protocols_body(history.seconds_window(seconds), labels))

    @app.get("/traffic_history")
    def traffic_history() -> Response:
        seconds = int_param("seconds", min(HISTORY_SECONDS_DEFAULT, history_max), history_max)
        return jsonify(history_body(history.seconds_window(seconds), labels, seconds))

    @app.get("/openapi.json")
    def openapi() -> Response:
        return jsonify(spec)

    @app.get("/dashboard")
    def dashboard() -> Response:
        """The browser client of this API: compat_api/static/dashboard.{html,js,css}, served at /static/."""
        response = app.send_static_file("dashboard.html")
        response.headers["Content-Security-Policy"] = DASHBOARD_CSP
        return response

    register_error_handlers(app)
    return app


def register_error_handlers(app: Flask) -> None:
    """Answer every error with a JSON body; unexpected exceptions are logged and become a 500."""

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        response = jsonify({"error": http_error_text(error)})
        response.status_code = error.code or 500
        # keep the error's own headers, such as Allow on a 405
        response.headers.extend((name, value) for name, value in error.get_headers()
                                if name.lower() != "content-type")
        return response

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> tuple[Response, int]:
        log.exception("unexpected error answering %s %s", request.method, request.full_path)
        return jsonify({"error": "internal server error"}), 500


def http_error_text(error: HTTPException) -> str:
    """The message of an HTTP error: ours for bad parameters, else the status phrase and path."""
    if isinstance(error, BadRequest) and error.description and error.description != BadRequest.description:
        return error.description
    name = (error.name or "error").lower()
    if error.code == 404:
        return f"{name}: {request.path}"
    if error.code == 405:
        return f"{name}: {request.method} {request.path}"
    return name


def int_param(name: str, default: int, high: int, low: int = 1) -> int:
    """The integer query parameter ``name`` in ``low..high``; absent means ``default``; else a 400."""
    values = request.args.getlist(name)
    if not values:
        return default
    text = values[0]
    if len(values) == 1 and text.isascii() and text.isdigit() and len(text) <= MAX_DIGITS:
        value = int(text)
        if low <= value <= high:
            return value
    once = " given once," if len(values) > 1 else ""
    raise BadRequest(f"{name} must be{once} an integer from {low} to {high}")


def load_openapi(history_seconds: int) -> dict:
    """The packaged OpenAPI document with every ``seconds`` parameter bounded by the history length."""
    text = resources.files(__package__).joinpath("openapi.json").read_text(encoding="utf-8")
    spec = json.loads(text)
    for parameter in spec.get("components", {}).get("parameters", {}).values():
        if parameter.get("name") == "seconds":
            schema = parameter["schema"]
            schema["maximum"] = history_seconds
            schema["default"] = min(schema.get("default", history_seconds), history_seconds)
    return spec


def index_body(status: CaptureStatus, servers: Sequence[str]) -> dict[str, Any]:
    """``GET /``: liveness, server addresses and capture health."""
    return {
        "message": "Backend (real capture) OK",
        "time": time.time(),
        "server_ip": servers[0] if servers else None,
        "server_ips": list(servers),
        "capture": {"running": status.running, "source": status.description, "error": status.error,
                    "packets": status.frames, "dropped": status.kernel_dropped},
    }


def traffic_body(view: ClientsView, labels: Sequence[str], limit: int,
                 client_facts: Optional[ClientFactsOf] = None) -> dict[str, Any]:
    """``GET /traffic``: bytes per client over the window, biggest first (with what is known of them)."""
    clients = [client_entry(client, counts, labels) for client, counts in zip(view.clients, view.counts)]
    if view.health is not None:
        for entry, health in zip(clients, view.health):
            entry.update(tcp_health_entry(health))
    clients.sort(key=lambda entry: (-entry["total"], entry["ip"]))
    clients = clients[:limit]
    if client_facts is not None:
        for entry in clients:
            entry.update(client_facts(entry["ip"]))
    return {"window": view.seconds, "clients": clients, "generated_at": time.time()}


def client_entry(client: str, counts: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """One client of ``/traffic`` from its bytes per (direction, protocol)."""
    bytes_in, bytes_out = (int(value) for value in counts.sum(axis=1))
    protocols = dict(zip(labels, (int(value) for value in counts.sum(axis=0))))
    return {"ip": client, "bytes_in": bytes_in, "bytes_out": bytes_out, "total": bytes_in + bytes_out,
            "protocols": protocols}


def tcp_health_entry(health: np.ndarray) -> dict[str, Optional[float]]:
    """A client's TCP health over the window, from its ``tally.window_health`` row: the median handshake
    round trip (estimated from the histogram buckets) and the retransmitted share of payload segments;
    None where there is nothing to measure."""
    buckets, segments, retransmitted = health[:-2].tolist(), int(health[-2]), int(health[-1])
    return {"handshake_rtt_p50_seconds": rtt_quantile(0.5, buckets),
            "retransmission_ratio": retransmitted / segments if segments else None}


def protocols_body(view: SecondsView, labels: Sequence[str]) -> dict[str, Any]:
    """``GET /protocols``: bytes, packets and share per protocol label over the window."""
    (bytes_in, bytes_out), (packets_in, packets_out) = view.counts.sum(axis=0).tolist()
    rows = [{"protocol": label, "bytes": bytes_in[index] + bytes_out[index], "bytes_in": bytes_in[index],
             "bytes_out": bytes_out[index], "packets": packets_in[index] + packets_out[index], "share": 0.0}
            for index, label in enumerate(labels)]
    total_bytes = sum(row["bytes"] for row in rows)
    for row in rows:
        row["share"] = row["bytes"] / total_bytes if total_bytes else 0.0
    rows.sort(key=lambda row: -row["bytes"])  # stable: equal rows keep the label order
    return {"window": len(view.stamps), "protocols": rows, "total_bytes": total_bytes, "generated_at": time.time()}


def history_body(view: SecondsView, labels: Sequence[str], seconds: int) -> dict[str, Any]:
    """``GET /traffic_history``: one entry per second, oldest first."""
    return {"seconds": seconds, "interval": 1,
            "buckets": [history_entry(int(stamp), counts, labels) for stamp, counts in zip(view.stamps, view.counts)],
            "generated_at": time.time()}


def history_entry(stamp: int, counts: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """One second of ``/traffic_history`` from its (bytes | packets, direction, protocol) counts."""
    nbytes, packets = counts.tolist()
    bytes_in, bytes_out = sum(nbytes[0]), sum(nbytes[1])
    return {"timestamp": stamp, "bytes_in": bytes_in, "bytes_out": bytes_out, "total": bytes_in + bytes_out,
            "packets": sum(packets[0]) + sum(packets[1]),
            "protocols": {label: nbytes[0][index] + nbytes[1][index] for index, label in enumerate(labels)}}
