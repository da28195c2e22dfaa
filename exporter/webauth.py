"""HTTP basic authentication from a Prometheus-style web config file (``--web-config``).

The file format is the one Prometheus exporters share (exporter-toolkit):

    basic_auth_users:
      alice: $2y$10$...   # bcrypt hash, e.g. from `htpasswd -nBC 10 "" | tr -d ':\\n'`

Every path is protected. bcrypt is slow on purpose, so a verified (user, password) pair is
remembered as a SHA-256 digest and later requests are checked against it in constant time.
Checks that need bcrypt are bounded: one at a time per client address and ``checks_in_flight`` in
all; a request beyond that gets 429 at once instead of a worker thread, so a flood of wrong
passwords cannot make a verified client wait.
"""
from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
import threading
from typing import Callable, Iterable, Mapping, Optional

import bcrypt
import yaml

from .config import ConfigError

REALM = "traffic-exporter"
UNSUPPORTED_KEYS = ("tls_server_config", "http_server_config")
BCRYPT_HASH = re.compile(rb"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# bcrypt reads only the first 72 bytes of a password: htpasswd -B and Go's bcrypt (exporter-toolkit)
# ignore the rest, bcrypt 5 raises instead, so longer passwords are cut here as the hash's maker did.
BCRYPT_PASSWORD_BYTES = 72
# Fewer than waitress's 8 worker threads, so most of them stay free for verified clients.
CHECKS_IN_FLIGHT = 2
RETRY_AFTER_SECONDS = 1


def is_bcrypt_hash(hashed: bytes) -> bool:
    """Whether bcrypt can check passwords against ``hashed`` ($2a$/$2b$/$2y$, cost 04 to 31)."""
    if not BCRYPT_HASH.fullmatch(hashed):
        return False
    try:
        # bcrypt's own parser also checks the salt's encoding; at cost 4 instead of the hash's own
        # cost that takes a millisecond, and a salt it refuses is found now rather than per request.
        bcrypt.checkpw(b"", hashed[:4] + b"04" + hashed[6:])
    except ValueError:
        return False
    return True


def bcrypt_cost(hashed: bytes) -> int:
    """The cost (log2 of the rounds) of a bcrypt hash."""
    return int(hashed[4:6])


def load_web_config(path: str) -> dict[str, bytes]:
    """Read ``basic_auth_users`` from ``path``; any problem is a ConfigError naming the flag."""
    try:
        with open(path, encoding="utf-8") as file:
            document = yaml.safe_load(file) or {}
    except OSError as error:
        raise ConfigError(f"--web-config: cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--web-config: {path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"--web-config: {path} must be a mapping with basic_auth_users")
    for key in UNSUPPORTED_KEYS:
        if document.get(key):
            raise ConfigError(f"--web-config: {key} is not supported; terminate TLS in a reverse proxy")
    users = document.get("basic_auth_users") or {}
    if not isinstance(users, dict) or not users:
        raise ConfigError(f"--web-config: {path} has no basic_auth_users (user: bcrypt hash)")
    hashes = {}
    for user, hashed in users.items():
        hashed = str(hashed).encode()
        if not is_bcrypt_hash(hashed):
            raise ConfigError(f"--web-config: the password of {user!r} is not a bcrypt hash "
                              "($2a$, $2b$ or $2y$, cost 04 to 31, as htpasswd -nBC 10 prints)")
        hashes[str(user)] = hashed
    return hashes


def parse_basic_auth(header: str) -> Optional[tuple[str, str]]:
    """The (user, password) of a ``Basic`` ``Authorization`` header, or None when it holds none."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        # ValueError covers bad base64, non-ASCII characters and credentials that are not UTF-8.
        credentials = base64.b64decode(encoded.strip(), validate=True).decode()
    except ValueError:
        return None
    user, separator, password = credentials.partition(":")
    return (user, password) if separator else None


class Verdict(enum.Enum):
    """What a request's credentials earn it."""

    GRANTED = "granted"
    DENIED = "denied"
    BUSY = "busy"  # not checked: bcrypt is busy for this address or for everyone; retry shortly


REFUSALS = {
    Verdict.DENIED: ("401 Unauthorized", b'{"error": "authentication required"}',
                     ("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')),
    Verdict.BUSY: ("429 Too Many Requests", b'{"error": "too many password checks under way, retry shortly"}',
                   ("Retry-After", str(RETRY_AFTER_SECONDS))),
}


class BasicAuthMiddleware:
    """WSGI middleware: 401 with ``WWW-Authenticate`` unless the credentials match, 429 while bcrypt is busy."""

    def __init__(self, app: Callable, users: Mapping[str, bytes], checks_in_flight: int = CHECKS_IN_FLIGHT):
        self.app = app
        self.users = dict(users)
        self.checks_in_flight = checks_in_flight
        # Unknown users are checked against the costliest configured hash, so that they take as long
        # as a known user (as the slowest one when costs differ); the outcome is thrown away.
        self._decoy_hash = max(self.users.values(), key=bcrypt_cost)
        self._verified: dict[str, bytes] = {}  # user -> sha256(user:password) of the last good password
        self._checking: set[str] = set()  # client addresses with a bcrypt check under way
        self._lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        credentials = parse_basic_auth(environ.get("HTTP_AUTHORIZATION", ""))
        verdict = Verdict.DENIED if credentials is None else self.verify(*credentials, environ.get("REMOTE_ADDR", ""))
        if verdict is Verdict.GRANTED:
            return self.app(environ, start_response)
        status, body, header = REFUSALS[verdict]
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), header])
        return [body]

    def verify(self, user: str, password: str, client: str) -> Verdict:
        """Check ``user``'s password: a remembered one at once, another with bcrypt if ``client`` may start one."""
        digest = hashlib.sha256(f"{user}:{password}".encode()).digest()
        with self._lock:
            remembered = self._verified.get(user)
            if remembered is not None and hmac.compare_digest(remembered, digest):
                return Verdict.GRANTED
            if client in self._checking or len(self._checking) >= self.checks_in_flight:
                return Verdict.BUSY
            self._checking.add(client)
        try:
            hashed = self.users.get(user)
            # checkpw compares in constant time; the decoy hash hides which users exist.
            good = bcrypt.checkpw(password.encode()[:BCRYPT_PASSWORD_BYTES], hashed or self._decoy_hash)
            good = good and hashed is not None
        finally:
            with self._lock:
                self._checking.discard(client)
        if good:
            with self._lock:
                self._verified[user] = digest
        return Verdict.GRANTED if good else Verdict.DENIED
