"""--web-config under attack: a wrong-password flood leaves verified scrapes fast; bad headers get 401, not 500."""
import base64
import contextlib
import http.client
import threading
import time
from typing import Iterator, Sequence

import bcrypt
import pytest

from testkit.process import running_exporter
from tests.builders import AFS_PCAP, AFS_SERVER

pytestmark = pytest.mark.integration
PASSWORD = "s3cret"
USERS = ("prometheus", "grafana", "operator")
FLOODERS = 60
FLOOD_SECONDS = 10  # hard cap on a flood, whatever happens to the requests measured during it
SCRAPE_BUDGET_SECONDS = 1.0
FIRST_LOGIN_BUDGET_SECONDS = 3.0  # one cost-12 bcrypt check: 0.25 s alone, 0.5 to 1.3 s while flooded
TIMEOUT_SECONDS = 5.0


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    """A served exporter whose users have cost-12 bcrypt hashes, as a careful operator would configure."""
    web_config = tmp_path_factory.mktemp("web") / "web.yml"
    lines = [f"  {user}: '{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=12)).decode()}'" for user in USERS]
    web_config.write_text("basic_auth_users:\n" + "\n".join(lines) + "\n")
    args = ["--pcap", str(AFS_PCAP), "--server-ip", AFS_SERVER, "--web-config", str(web_config)]
    with running_exporter(args, ready_path=None) as (base, _):
        yield int(base.rsplit(":", 1)[1])


def get_metrics(port: int, authorization: str, source: str = "127.0.0.1",
                timeout: float = TIMEOUT_SECONDS) -> tuple[int, http.client.HTTPMessage, float]:
    """GET /metrics from ``source`` on a new connection; return the status, headers and seconds taken."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        # http.client sends header values as latin-1, so "\xe9" goes out as the single byte 0xE9.
        connection.request("GET", "/metrics", headers={"Authorization": authorization})
        response = connection.getresponse()
        response.read()
        return response.status, response.headers, time.monotonic() - started
    finally:
        connection.close()


def timed_status(port: int, authorization: str, source: str = "127.0.0.1") -> tuple[int, float]:
    """The status and seconds of a GET /metrics; a timeout counts as status 0 after TIMEOUT_SECONDS."""
    try:
        status, _, seconds = get_metrics(port, authorization, source)
    except TimeoutError:
        return 0, TIMEOUT_SECONDS
    return status, seconds


@contextlib.contextmanager
def wrong_password_flood(port: int, sources: Sequence[str]) -> Iterator[list]:
    """FLOODERS threads send a new wrong password each, again and again, from ``sources`` in turn.

    Yields the list their statuses go into, once every worker thread has had wrong passwords to check;
    stops and joins them when the block ends, or after FLOOD_SECONDS at the latest.
    """
    stop, statuses = threading.Event(), []
    deadline = time.monotonic() + FLOOD_SECONDS

    def flood(index: int) -> None:
        attempt = 0
        while not stop.is_set() and time.monotonic() < deadline:
            attempt += 1
            try:
                password = f"wrong-{index}-{attempt}"
                statuses.append(get_metrics(port, basic("prometheus", password), sources[index % len(sources)])[0])
            except OSError as error:
                statuses.append(type(error).__name__)

    flooders = [threading.Thread(target=flood, args=(index,), daemon=True) for index in range(FLOODERS)]
    try:
        for thread in flooders:
            thread.start()
        time.sleep(1.5)
        yield statuses
    finally:
        stop.set()
        for thread in flooders:
            thread.join(10)
    assert not any(thread.is_alive() for thread in flooders)


def answer_counts(statuses: list) -> dict:
    return {status: statuses.count(status) for status in set(statuses)}


def test_verified_scrape_answers_within_a_second_during_a_flood_from_60_addresses(port):
    valid = basic("prometheus", PASSWORD)
    status, first_login = timed_status(port, valid)
    assert status == 200  # the first login pays bcrypt once; later scrapes are remembered
    scrapes = []
    with wrong_password_flood(port, [f"127.0.0.{10 + index}" for index in range(FLOODERS)]) as statuses:
        for _ in range(5):
            scrapes.append(timed_status(port, valid))
            time.sleep(0.3)
        newcomer = get_metrics(port, basic("operator", PASSWORD), "127.0.0.2")
    newcomer_status, newcomer_headers, newcomer_seconds = newcomer
    counts = answer_counts(statuses)
    print(f"first login {first_login:.3f} s; scrapes under flood {scrapes}; "
          f"a first login under flood: {newcomer_status} in {newcomer_seconds:.3f} s; flood answers {counts}")
    assert [status for status, _ in scrapes] == [200] * 5
    assert max(seconds for _, seconds in scrapes) < SCRAPE_BUDGET_SECONDS, scrapes
    # bcrypt is busy with the flood, so a first login may have to come back, but it is told so at once.
    assert newcomer_status == 200 or (newcomer_status == 429 and newcomer_headers["Retry-After"] == "1")
    assert newcomer_seconds < FIRST_LOGIN_BUDGET_SECONDS
    assert set(counts) <= {401, 429} and 401 in counts, counts  # wrong passwords never pass, never 500


def test_first_login_from_another_address_succeeds_during_a_flood_from_one_address(port):
    with wrong_password_flood(port, ["127.0.0.1"]) as statuses:
        status, seconds = timed_status(port, basic("grafana", PASSWORD), "127.0.0.2")
    print(f"first login from another address under flood: {status} in {seconds:.3f} s; "
          f"flood answers {answer_counts(statuses)}")
    assert status == 200 and seconds < FIRST_LOGIN_BUDGET_SECONDS


@pytest.mark.parametrize("authorization", [
    "Basic \xe9",                                                          # a non-ASCII byte
    "Basic " + base64.b64encode(b"prometheus:\xff\xfe").decode(),          # credentials not UTF-8
    basic("prometheus", "x" * 100),                                        # a password over 72 bytes
    "Basic cHJvbWV0aGV1cw",                                                # base64 without its padding
])
def test_malformed_authorization_gets_401_with_the_challenge(port, authorization):
    status, headers, _ = get_metrics(port, authorization)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
