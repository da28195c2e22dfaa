"""HTTP basic authentication from a Prometheus-style web config file (``--web-config``).

The file format is the one Prometheus exporters share (exporter-toolkit):

    basic_auth_users:
      alice: $2y$10$...   # bcrypt hash, e.g. from `htpasswd -nBC 10 "" | tr -d ':\\n'`

Every path is protected. bcrypt is slow on purpose, so a verified (user, password) pair is
remembered as a SHA-256 digest and later requests are checked against it in constant time.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import threading
from typing import Callable, Iterable, Mapping

import bcrypt
import yaml

from .config import ConfigError

REALM = "traffic-exporter"
# Compared against when the user is unknown, so unknown users cost as much time as known ones.
_DUMMY_HASH = bcrypt.hashpw(b"unused", bcrypt.gensalt(rounds=10))
UNSUPPORTED_KEYS = ("tls_server_config", "http_server_config")


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
        if not hashed.startswith((b"$2a$", b"$2b$", b"$2y$")):
            raise ConfigError(f"--web-config: the password of {user!r} is not a bcrypt hash ($2a$/$2b$/$2y$)")
        hashes[str(user)] = hashed
    return hashes


class BasicAuthMiddleware:
    """WSGI middleware answering 401 with ``WWW-Authenticate`` unless the credentials match."""

    def __init__(self, app: Callable, users: Mapping[str, bytes], cache_size: int = 1024):
        self.app = app
        self.users = dict(users)
        self.cache_size = cache_size
        self._verified: dict[str, bytes] = {}  # user -> sha256(user:password) of the last good password
        self._lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if self.authorized(environ.get("HTTP_AUTHORIZATION", "")):
            return self.app(environ, start_response)
        body = b'{"error": "authentication required"}'
        start_response("401 Unauthorized", [("Content-Type", "application/json"),
                                            ("Content-Length", str(len(body))),
                                            ("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')])
        return [body]

    def authorized(self, header: str) -> bool:
        """Whether an ``Authorization`` header carries a configured user's password."""
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, separator, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not separator:
            return False
        digest = hashlib.sha256(f"{user}:{password}".encode()).digest()
        with self._lock:
            remembered = self._verified.get(user)
        if remembered is not None and hmac.compare_digest(remembered, digest):
            return True
        hashed = self.users.get(user)
        # bcrypt.checkpw compares in constant time; the dummy hash hides which users exist.
        good = bcrypt.checkpw(password.encode(), hashed or _DUMMY_HASH) and hashed is not None
        if good:
            with self._lock:
                if len(self._verified) >= self.cache_size:
                    self._verified.clear()
                self._verified[user] = digest
        return good
