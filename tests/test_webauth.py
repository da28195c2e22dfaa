"""--web-config: Prometheus exporter-toolkit basic auth users with bcrypt hashes."""
import base64

import bcrypt
import pytest
from werkzeug.test import Client

from exporter.config import ConfigError
from exporter.webauth import BasicAuthMiddleware, load_web_config

HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def client():
    return Client(BasicAuthMiddleware(hello, {"alice": HASH.encode()}))


@pytest.mark.parametrize("headers", [{}, basic("alice", "wrong"), basic("mallory", "s3cret"),
                                     {"Authorization": "Bearer abc"}, {"Authorization": "Basic !!!"},
                                     {"Authorization": "Basic " + base64.b64encode(b"alice").decode()}])
def test_missing_or_wrong_credentials_get_401_with_challenge(client, headers):
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith('Basic realm="traffic-exporter"')
    assert response.get_json() == {"error": "authentication required"}


def test_right_credentials_pass_and_are_remembered(client, monkeypatch):
    assert client.get("/", headers=basic("alice", "s3cret")).data == b"hello"
    calls = []
    monkeypatch.setattr(bcrypt, "checkpw", lambda *a: calls.append(a) or False)
    assert client.get("/", headers=basic("alice", "s3cret")).status_code == 200  # no second bcrypt
    assert client.get("/", headers=basic("alice", "other")).status_code == 401  # a new password pays bcrypt
    assert len(calls) == 1


def test_load_web_config_reads_basic_auth_users(tmp_path):
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  alice: '{HASH}'\n")
    assert load_web_config(str(path)) == {"alice": HASH.encode()}


@pytest.mark.parametrize("text, message", [
    ("basic_auth_users: {}\n", "has no basic_auth_users"),
    ("basic_auth_users:\n  alice: plain\n", "is not a bcrypt hash"),
    ("tls_server_config:\n  cert_file: x\n", "tls_server_config is not supported"),
    ("basic_auth_users: [\n", "is not valid YAML"),
])
def test_bad_web_config_is_a_config_error(tmp_path, text, message):
    path = tmp_path / "web.yml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_web_config(str(path))


def test_missing_web_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_web_config(str(tmp_path / "nope.yml"))
