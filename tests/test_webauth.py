"""--web-config: Prometheus exporter-toolkit basic auth users with bcrypt hashes."""
import base64
import threading
import time

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


def raw_basic(credentials: bytes):
    return {"Authorization": "Basic " + base64.b64encode(credentials).decode()}


def from_address(address):
    return {"REMOTE_ADDR": address}


@pytest.fixture
def client():
    return Client(BasicAuthMiddleware(hello, {"alice": HASH.encode()}))


@pytest.fixture
def bcrypt_calls(monkeypatch):
    """The hashes bcrypt.checkpw is given, in order; the real check still runs."""
    calls, real_checkpw = [], bcrypt.checkpw

    def recording_checkpw(password, hashed):
        calls.append(hashed)
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", recording_checkpw)
    return calls


def cost_of(hashed: bytes) -> int:
    return int(hashed.split(b"$")[2])


@pytest.mark.parametrize("headers", [{}, basic("alice", "wrong"), basic("mallory", "s3cret"),
                                     {"Authorization": "Bearer abc"}, {"Authorization": "Basic !!!"},
                                     {"Authorization": "Basic " + base64.b64encode(b"alice").decode()}])
def test_missing_or_wrong_credentials_get_401_with_challenge(client, headers):
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith('Basic realm="traffic-exporter"')
    assert response.get_json() == {"error": "authentication required"}


@pytest.mark.parametrize("authorization", [
    "Basic \xe9",                                            # a non-ASCII byte (WSGI hands it over as latin-1)
    "Basic YWxp\xe9Y2U6czNjcmV0",                            # one inside otherwise valid base64
    "B\xe4sic YWxpY2U6czNjcmV0",                             # in the scheme
    "Basic \u20ac",                                          # beyond latin-1, as a non-waitress server may pass
    "Basic",                                                 # no credentials at all
    "Basic ",
    "Basic YWxpY2U6czNjcmV0 extra",                          # trailing garbage
    "Basic ====",                                            # padding only
    "Basic " + base64.b64encode(b"alice:\xff\xfe").decode(),  # a password that is not UTF-8
    "Basic " + base64.b64encode(b"\xe9:s3cret").decode(),    # a user name that is not UTF-8
    "Basic " + base64.b64encode(b"alice:" + b"x" * 100).decode(),  # a wrong password over bcrypt's 72 bytes
    "Basic " + base64.b64encode(b"alice:s3\x00cret").decode(),  # a NUL byte
    "Basic " + base64.b64encode(b"alice:" + "é".encode() * 50).decode(),  # 100 bytes, 50 characters
])
def test_malformed_authorization_gets_401_with_challenge_never_500(client, authorization):
    response = client.get("/metrics", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith('Basic realm="traffic-exporter"')


def test_password_over_72_bytes_logs_in_as_htpasswd_hashed_it():
    password = "correct horse battery staple " * 3  # 87 bytes
    # htpasswd -B, Apache and Go's bcrypt all use only the first 72 bytes; bcrypt 5 refuses more.
    hashed = bcrypt.hashpw(password.encode()[:72], bcrypt.gensalt(rounds=4))
    client = Client(BasicAuthMiddleware(hello, {"alice": hashed}))
    assert client.get("/", headers=basic("alice", password)).status_code == 200
    assert client.get("/", headers=basic("alice", password[:71])).status_code == 401


def test_right_credentials_pass_and_are_remembered(client, monkeypatch):
    assert client.get("/", headers=basic("alice", "s3cret")).data == b"hello"
    calls = []
    monkeypatch.setattr(bcrypt, "checkpw", lambda *a: calls.append(a) or False)
    assert client.get("/", headers=basic("alice", "s3cret")).status_code == 200  # no second bcrypt
    assert client.get("/", headers=basic("alice", "other")).status_code == 401  # a new password pays bcrypt
    assert len(calls) == 1


def test_unknown_users_pay_the_bcrypt_cost_of_the_most_expensive_known_user(bcrypt_calls):
    users = {"alice": bcrypt.hashpw(b"a", bcrypt.gensalt(rounds=4)),
             "bob": bcrypt.hashpw(b"b", bcrypt.gensalt(rounds=6))}
    client = Client(BasicAuthMiddleware(hello, users))
    assert client.get("/", headers=basic("bob", "wrong")).status_code == 401
    assert client.get("/", headers=basic("mallory", "wrong")).status_code == 401
    assert client.get("/", headers=basic("mallory", "a")).status_code == 401  # alice's password is not everyone's
    assert [cost_of(hashed) for hashed in bcrypt_calls] == [6, 6, 6]


def test_unknown_and_known_users_take_comparable_time_with_a_cost_12_hash():
    client = Client(BasicAuthMiddleware(hello, {"alice": bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=12))}))

    def fastest_of_two(user):
        times = []
        for attempt in range(2):
            started = time.perf_counter()
            assert client.get("/", headers=basic(user, f"wrong{attempt}")).status_code == 401
            times.append(time.perf_counter() - started)
        return min(times)

    known, unknown = fastest_of_two("alice"), fastest_of_two("mallory")
    assert 0.5 < unknown / known < 2, f"known user {known:.3f} s, unknown user {unknown:.3f} s"


def test_bcrypt_checks_are_bounded_per_address_and_in_total_but_verified_clients_never_wait(monkeypatch):
    real_checkpw, checking, release = bcrypt.checkpw, threading.Semaphore(0), threading.Event()

    def checkpw_held_open_for_hold(password, hashed):
        if password == b"hold":
            checking.release()
            release.wait(10)
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", checkpw_held_open_for_hold)
    client = Client(BasicAuthMiddleware(hello, {"alice": HASH.encode()}, checks_in_flight=2))
    held = {}

    def hold_a_check(address):
        held[address] = client.get("/", headers=basic("alice", "hold"), environ_overrides=from_address(address))

    holders = [threading.Thread(target=hold_a_check, args=(address,)) for address in ("10.0.0.1", "10.0.0.3")]
    try:
        holders[0].start()
        assert checking.acquire(timeout=5)
        busy = client.get("/", headers=basic("alice", "s3cret"), environ_overrides=from_address("10.0.0.1"))
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
        other = client.get("/", headers=basic("alice", "s3cret"), environ_overrides=from_address("10.0.0.2"))
        assert other.status_code == 200  # another address still gets the second check
        holders[1].start()
        assert checking.acquire(timeout=5)
        full = client.get("/", headers=basic("alice", "other"), environ_overrides=from_address("10.0.0.4"))
        assert full.status_code == 429  # both checks in flight: no third
        verified = client.get("/", headers=basic("alice", "s3cret"), environ_overrides=from_address("10.0.0.1"))
        assert verified.status_code == 200  # remembered credentials pay no bcrypt, so never wait for one
    finally:
        release.set()
        for holder in holders:
            if holder.ident is not None:  # started
                holder.join(10)
    assert [held[address].status_code for address in ("10.0.0.1", "10.0.0.3")] == [401, 401]
    again = client.get("/", headers=basic("alice", "wrong"), environ_overrides=from_address("10.0.0.1"))
    assert again.status_code == 401  # the finished checks gave their places back


def test_load_web_config_reads_basic_auth_users(tmp_path):
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  alice: '{HASH}'\n")
    assert load_web_config(str(path)) == {"alice": HASH.encode()}


@pytest.mark.parametrize("text, message", [
    ("basic_auth_users: {}\n", "has no basic_auth_users"),
    ("basic_auth_users:\n  alice: plain\n", "is not a bcrypt hash"),
    ("basic_auth_users:\n  alice: '$2y$10$short'\n", "is not a bcrypt hash"),
    ("basic_auth_users:\n  alice: '$2y$03$" + HASH[7:] + "'\n", "is not a bcrypt hash"),  # cost below 4
    ("basic_auth_users:\n  alice: '$2y$10$" + "A" * 53 + "'\n", "is not a bcrypt hash"),  # salt bcrypt refuses
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
