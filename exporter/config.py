"""One frozen configuration object, filled from CLI flags, then environment variables, then defaults."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

from .demo import DEMO_PCAP, DEMO_SERVER_IPS
from .tally import DEFAULT_CLIENT_IDLE_SECONDS, DEFAULT_MAX_CLIENTS, DEFAULT_MAX_TCP_FLOWS

LOG_LEVELS = ("debug", "info", "warning", "error")
REPLAY_SPEEDS = ("realtime", "max")
CAPTURE_BACKENDS = ("auto", "af_packet", "libpcap")
OUTPUT_FORMATS = ("table", "json")
CLIENT_BY = ("ip", "asn", "country")
STREAM_PCAP = "-"  # --pcap - and summarize -: the capture streamed to standard input


class ConfigError(Exception):
    """An invalid setting; the message names the flag and the accepted values."""


@dataclass(frozen=True)
class Config:
    interface: Optional[str] = None
    server_ips: tuple[str, ...] = ()
    filter: str = ""
    capture_buffer_mib: int = 16  # the engine keeps up with tcpreplay's top speed: the ring bridges stalls
    capture_backend: str = "auto"
    fanout_group: Optional[int] = None
    pcap: Optional[str] = None
    replay_speed: str = "max"
    loop: bool = False
    demo: bool = False
    listen_host: str = "0.0.0.0"
    listen_port: int = 8000
    history_seconds: int = 300
    max_clients: int = DEFAULT_MAX_CLIENTS
    client_idle_seconds: int = DEFAULT_CLIENT_IDLE_SECONDS
    client_prefix_v4: int = 32
    client_prefix_v6: int = 128
    tcp_health: bool = True
    max_tcp_flows: int = DEFAULT_MAX_TCP_FLOWS
    cors_origins: tuple[str, ...] = ("*",)
    log_level: str = "info"
    user: Optional[str] = None
    state_file: Optional[str] = None
    web_config: Optional[str] = None
    web_max_connections: int = 512
    web_request_timeout: int = 10
    web_idle_timeout: int = 60
    geoip_dbs: tuple[str, ...] = ()
    client_by: str = "ip"
    resolve_names: bool = False
    resolve_rate: int = 10  # PTR queries per second at most: a flood of new clients must not flood the DNS server
    # summarize only
    output_format: str = "table"

    def live_backend(self) -> str:
        """The live capture backend ``auto`` stands for on this platform."""
        if self.capture_backend != "auto":
            return self.capture_backend
        return "af_packet" if sys.platform.startswith("linux") else "libpcap"

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return value
    return parse


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text.lower()
    return parse


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _on_off(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("on", "off"):
        raise ValueError("expected on or off")
    return lowered == "on"


def _comma_list(text: str) -> tuple[str, ...]:
    """The non-empty comma-separated parts of ``text``, stripped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _server_ips(text: str) -> tuple[str, ...]:
    specs = _comma_list(text)
    for spec in specs:
        try:
            ipaddress.ip_network(spec, strict=False)
        except ValueError:
            raise ValueError("expected IP addresses or CIDR networks, comma-separated") from None
    return specs


def _listen(text: str) -> tuple[str, int]:
    host, separator, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        if not separator or not host:
            raise ValueError
        ipaddress.ip_address(host)
        number = int(port)
        if not 1 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise ValueError("expected ADDRESS:PORT, e.g. 0.0.0.0:8000 or [::]:8000") from None
    return host, number


def _text(text: str) -> str:
    return text


def _user(text: str) -> Optional[str]:
    import pwd

    if not text:
        return None  # an empty TRAFFIC_USER (e.g. from docker compose) means "stay as started"
    try:
        pwd.getpwuid(int(text)) if text.isdigit() else pwd.getpwnam(text)
    except KeyError:
        raise ValueError("no such user on this system") from None
    return text


# dest, flags, parser, help; the environment variable is TRAFFIC_<DEST>
SERVE_OPTIONS: list[tuple[str, tuple[str, ...], Callable[[str], Any], str]] = [
    ("interface", ("--interface", "-i"), _text, "interface to capture on (default: the one holding the default route)"),
    ("server_ip", ("--server-ip",), _server_ips,
     "server address or CIDR network; repeatable or comma-separated (env SERVER_IP too)"),
    ("filter", ("--filter",), _text, "BPF filter applied to the capture"),
    ("capture_buffer_mib", ("--capture-buffer-mib",), _integer(4, 4096),
     "size of the kernel capture ring in MiB (absorbs bursts; resident memory)"),
    ("capture_backend", ("--capture-backend",), _choice(CAPTURE_BACKENDS),
     "live capture through the AF_PACKET ring (Linux) or libpcap; auto: the ring on Linux, libpcap elsewhere"),
    ("fanout_group", ("--fanout-group",), _integer(0, 65535),
     "share the interface with the other exporters of this PACKET_FANOUT group, split by flow"),
    ("pcap", ("--pcap",), _text,
     "replay this pcap/pcapng file, or count the capture streamed to standard input (-), instead of capturing live"),
    ("replay_speed", ("--replay-speed",), _choice(REPLAY_SPEEDS), "pcap replay pace: realtime or max"),
    ("loop", ("--loop",), _boolean, "replay the pcap file in a loop"),
    ("demo", ("--demo",), _boolean, "replay the bundled demo capture in a loop at its recorded pace (no root needed)"),
    ("listen", ("--listen",), _listen, "address and port to serve /metrics and the REST API on"),
    ("history_seconds", ("--history-seconds",), _integer(10, 86400), "seconds of one-second history kept"),
    ("max_clients", ("--max-clients",), _integer(0, 1_000_000), "clients with their own series; the rest is 'other'"),
    ("client_idle_seconds", ("--client-idle-seconds",), _integer(1, 31 * 86400),
     "evict a client's series after this many idle seconds"),
    ("client_prefix_v4", ("--client-prefix-v4",), _integer(0, 32), "aggregate IPv4 clients into networks of this prefix"),
    ("client_prefix_v6", ("--client-prefix-v6",), _integer(0, 128), "aggregate IPv6 clients into networks of this prefix"),
    ("tcp_health", ("--tcp-health",), _on_off,
     "per-client TCP health (handshake round trip, retransmissions, resets): on or off"),
    ("max_tcp_flows", ("--max-tcp-flows",), _integer(1, 10_000_000),
     "TCP connections tracked for TCP health at most; the least recently seen one makes room"),
    ("cors_origin", ("--cors-origin",), _text, "allowed CORS origins, comma-separated ('*' for any)"),
    ("log_level", ("--log-level",), _choice(LOG_LEVELS), "logging level"),
    ("state_file", ("--state-file",), _text, "save counters and history here every minute and at exit; restore at start"),
    ("web_config", ("--web-config",), _text, "Prometheus-style web config file with basic_auth_users (bcrypt)"),
    ("web_max_connections", ("--web-max-connections",), _integer(1, 65536),
     "open HTTP connections at most; a new one closes the one that has waited longest on its client"),
    ("web_request_timeout", ("--web-request-timeout",), _integer(1, 3600),
     "seconds a client has to send a whole request (from its first byte) and to take each part of a response"),
    ("web_idle_timeout", ("--web-idle-timeout",), _integer(1, 86400),
     "close an HTTP connection after this many seconds without a request"),
    ("user", ("--user",), _user,
     "after opening the capture socket, switch to this user, keeping only CAP_NET_RAW (like tcpdump -Z)"),
    ("geoip_db", ("--geoip-db",), _comma_list,
     "MaxMind-format ASN and/or country database (GeoLite2, DB-IP); repeatable or comma-separated"),
    ("client_by", ("--client-by",), _choice(CLIENT_BY),
     "what a client is: its address (ip), its AS (asn) or its country (country), from --geoip-db"),
    ("resolve_names", ("--resolve-names",), _boolean,
     "resolve tracked clients' host names (PTR) in the background through the system resolver"),
    ("resolve_rate", ("--resolve-rate",), _integer(1, 1000), "PTR queries per second at most (--resolve-names)"),
]
SUMMARIZE_MAX_CLIENTS = 1_000_000  # offline analysis lists every client unless told otherwise
SUMMARIZE_OPTIONS = [option for option in SERVE_OPTIONS
                     if option[0] in ("server_ip", "filter", "max_clients", "client_prefix_v4", "client_prefix_v6",
                                      "tcp_health", "max_tcp_flows", "log_level", "geoip_db", "client_by",
                                      "resolve_names", "resolve_rate")]
SUMMARIZE_OPTIONS.append(("output_format", ("--format",), _choice(OUTPUT_FORMATS), "table for people, json for programs"))
FLAGS_WITHOUT_VALUE = {"loop", "demo", "resolve_names"}
REPEATABLE = {"server_ip", "geoip_db"}
# Flags that choose what to capture; --demo decides that itself.
DEMO_CONFLICTS = {"pcap": "--pcap", "interface": "--interface", "server_ips": "--server-ip", "user": "--user"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise ConfigError(message)


def build_parser(options, prog: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description)
    for dest, flags, _parse, help_text in options:
        if dest in FLAGS_WITHOUT_VALUE:
            parser.add_argument(*flags, dest=dest, action="store_const", const="true", help=help_text)
        elif dest in REPEATABLE:
            parser.add_argument(*flags, dest=dest, action="append", metavar="IP[/PREFIX]" if dest == "server_ip"
                                else "PATH", help=help_text)
        else:
            parser.add_argument(*flags, dest=dest, help=help_text)
    return parser


def serve_config(argv: Sequence[str], environ: Optional[dict] = None, prog: str = "traffic-exporter") -> Config:
    """The configuration of ``serve``, checked as a whole: flags that do not go together are refused."""
    config = parse_config(argv, environ=environ, prog=prog)
    if config.demo:
        given = [flag for name, flag in DEMO_CONFLICTS.items() if getattr(config, name)]
        if given:
            raise ConfigError(f"--demo: replays its own capture; leave out {', '.join(given)}")
        config = replace(config, pcap=str(DEMO_PCAP), replay_speed="realtime", loop=True, server_ips=DEMO_SERVER_IPS)
    if config.user and config.pcap:
        raise ConfigError("--user: only applies to live capture (a pcap replay needs no privileges)")
    if config.fanout_group is not None and config.pcap:
        raise ConfigError("--fanout-group: only applies to live capture")
    if config.fanout_group is not None and config.live_backend() != "af_packet":
        raise ConfigError("--fanout-group: needs --capture-backend af_packet (Linux)")
    if config.interface and config.pcap:
        raise ConfigError("--interface: only applies to live capture; leave it out with --pcap")
    if not config.pcap and (config.loop or config.replay_speed == "realtime"):
        raise ConfigError("--loop and --replay-speed: only apply to a replay (--pcap FILE)")
    if config.pcap == STREAM_PCAP:
        if config.loop:
            raise ConfigError("--loop: a stream (--pcap -) is read once, as it arrives; leave --loop out")
        if config.replay_speed == "realtime":
            raise ConfigError("--replay-speed: a stream (--pcap -) is counted as it arrives; leave realtime out")
        _check_stream(config, "--pcap -")
    if config.user and os.geteuid() != 0:
        raise ConfigError("--user: switching users needs root; start as root or leave --user out")
    return config


def summarize_config(argv: Sequence[str], environ: Optional[dict] = None,
                     prog: str = "traffic-exporter summarize") -> Config:
    """The configuration of ``summarize FILE``: flags only (variables set for the service do not apply)."""
    config = parse_config(argv, SUMMARIZE_OPTIONS, environ={} if environ is None else environ, positional="file",
                          prog=prog, defaults={"max_clients": SUMMARIZE_MAX_CLIENTS})
    if config.pcap == STREAM_PCAP:
        _check_stream(config, "summarize -")
    return config


def _check_stream(config: Config, reading: str) -> None:
    """What a stream cannot do: have its server guessed from its first frames (read twice), or be filtered here."""
    if not config.server_ips:
        raise ConfigError(f"--server-ip: needed with {reading} (the server cannot be guessed from a stream)")
    if config.filter:
        raise ConfigError(f"--filter: not applied to a stream ({reading}); filter where it is captured "
                          f"(tcpdump -U -w - FILTER)")


def parse_config(argv: Sequence[str], options=SERVE_OPTIONS, environ: Optional[dict] = None,
                 positional: Optional[str] = None, prog: str = "traffic-exporter",
                 defaults: Optional[dict] = None) -> Config:
    """Build the configuration: flag, else ``TRAFFIC_<FLAG>`` (or ``SERVER_IP``), else the default."""
    environ = os.environ if environ is None else environ
    parser = build_parser(options, prog, "Count a server's traffic per client, direction and protocol.")
    if positional:
        parser.add_argument(positional)
    namespace = parser.parse_args(list(argv))
    values: dict[str, Any] = dict(defaults or {})
    if positional:
        values["pcap"] = getattr(namespace, positional)
    for dest, flags, parse, _help in options:
        raw = getattr(namespace, dest)
        origin = flags[0]
        if dest in REPEATABLE and raw is not None:
            raw = ",".join(raw)
        if raw is None:
            env_name = "TRAFFIC_" + flags[0].lstrip("-").upper().replace("-", "_")
            raw = environ.get(env_name)
            if raw is None and dest == "server_ip":
                env_name = "SERVER_IP"
                raw = environ.get(env_name)
            origin = f"{flags[0]} (from {env_name})"
            if raw is not None and not raw.strip():
                raw = None  # an empty variable (compose's ${VAR:-}) means "use the default"
        if raw is None:
            continue
        try:
            values[dest] = parse(raw)
        except ValueError as error:
            raise ConfigError(f"{origin}: {error}; got {raw!r}") from None
    return _check_grouping(_to_config(values))


def _check_grouping(config: Config) -> Config:
    """--client-by asn|country needs a database and replaces the prefix lengths; one line otherwise."""
    if config.client_by != "ip":
        if config.client_prefix_v4 != 32 or config.client_prefix_v6 != 128:
            raise ConfigError(f"--client-prefix-v4/-v6: only apply to --client-by ip, not {config.client_by}")
        if not config.geoip_dbs:
            raise ConfigError(f"--client-by {config.client_by}: needs a --geoip-db with {config.client_by} data")
    return config


def _to_config(values: dict[str, Any]) -> Config:
    if "server_ip" in values:
        values["server_ips"] = values.pop("server_ip")
    if "geoip_db" in values:
        values["geoip_dbs"] = values.pop("geoip_db")
    if "listen" in values:
        values["listen_host"], values["listen_port"] = values.pop("listen")
    if "cors_origin" in values:
        values["cors_origins"] = _comma_list(values.pop("cors_origin")) or ("*",)
    return Config(**values)
