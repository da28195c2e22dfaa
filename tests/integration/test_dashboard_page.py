"""/dashboard in headless Chromium, against ``python -m exporter --demo`` running as an unprivileged user.

Only 127.0.0.1 is contacted: the exporter listens there, and Chromium runs with its background
networking off and a fresh profile. Every wait is bounded.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, TypeVar

import pytest

from testkit.process import get, running_exporter
from tests.integration.unprivileged import NOBODY, unprivileged_wrapper

pytestmark = pytest.mark.integration

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements.txt)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACT = REPO_ROOT / "artifacts" / "dashboard.png"
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "dashboard.png"
CAP_NET_RAW_MASK = 1 << 13
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900")
WAIT_SECONDS = 30.0
# For docs/dashboard.png: let the replay reach its FTP upload, so the chart shows a download burst,
# a quiet spell and an upload (scripts/make_demo_pcap.py has the timeline).
SCREENSHOT_REPLAY_SECONDS = 75.0
# The colours of the throughput lines (dashboard.css --in and --out), to find them among the pixels.
SERIES_COLOURS = ((0x2F, 0x6F, 0xDE), (0xE8, 0x77, 0x2E))

if CHROMIUM is None or not os.path.exists(CHROMEDRIVER):
    pytest.skip("chromium and chromedriver are not installed (Debian packages chromium, chromium-driver)",
                allow_module_level=True)

T = TypeVar("T")


def wait_for(probe: Callable[[], T], what: str, timeout: float = WAIT_SECONDS) -> T:
    """Call ``probe`` until it returns something true; fail naming ``what`` after ``timeout`` seconds.

    The page redraws its tables every second, so an element found by one call may be gone by the next:
    a probe that meets such a stale element just tries again.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {value!r})")
        time.sleep(0.25)


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as file:
        return dict(line.split(":", 1) for line in file.read().splitlines() if ":" in line)


@pytest.fixture(scope="module")
def exporter():
    """The demo, started as nobody (when the tests run as root) on a free loopback port."""
    wrapper = unprivileged_wrapper() if os.geteuid() == 0 else []
    with running_exporter(["--demo"], command=wrapper, cwd=REPO_ROOT) as (base, process):
        yield base, process, time.monotonic()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_SECONDS)
    driver.set_script_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


def top_client_shown(driver) -> str:
    cells = driver.find_elements(By.CSS_SELECTOR, "#clients tbody tr:first-child td.client")
    return cells[0].text if cells else ""


def top_client_reported(base: str) -> str:
    clients = json.loads(get(base + "/traffic?limit=1"))["clients"]
    return clients[0]["ip"] if clients else ""


def series_pixels(driver) -> int:
    """Pixels of the throughput canvas drawn in the colour of the in or out line."""
    return driver.execute_script("""
        const canvas = document.getElementById("throughput");
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        const colours = arguments[0];
        let count = 0;
        for (let i = 0; i < data.length; i += 4) {
          if (data[i + 3] > 200 && colours.some(([r, g, b]) =>
              Math.abs(data[i] - r) < 24 && Math.abs(data[i + 1] - g) < 24 && Math.abs(data[i + 2] - b) < 24)) {
            count += 1;
          }
        }
        return count;""", [list(colour) for colour in SERIES_COLOURS])


@pytest.fixture(scope="module")
def dashboard(exporter, browser):
    """The page loaded and showing data; yields the browser console messages logged until then."""
    base, _process, _started = exporter
    browser.get(base + "/dashboard")
    wait_for(lambda: series_pixels(browser) > 100, "the throughput chart to be drawn")
    wait_for(lambda: top_client_shown(browser), "a client in the table")
    yield browser.get_log("browser")


def test_demo_runs_without_root_or_capture_capabilities(exporter):
    if os.geteuid() != 0:
        pytest.skip("already unprivileged")
    status = proc_status(exporter[1].pid)
    assert status["Uid"].split() == [str(NOBODY)] * 4
    assert int(status["CapEff"], 16) & CAP_NET_RAW_MASK == 0


def test_dashboard_shows_the_top_client_that_traffic_reports(exporter, browser, dashboard):
    base = exporter[0]

    def same_top_client():
        shown, reported = top_client_shown(browser), top_client_reported(base)
        return shown == reported and shown

    assert wait_for(same_top_client, "the table's first client to equal /traffic's")


def test_dashboard_shows_tcp_health_columns_as_traffic_reports_them(exporter, browser, dashboard):
    """The demo runs with TCP health on: /traffic has the fields, the table its two columns."""
    base = exporter[0]
    headers = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#clients th.tcp") if cell.is_displayed()]
    assert headers == ["RTT p50", "Retrans"]

    def same_retransmission_cell():
        cells = browser.find_elements(By.CSS_SELECTOR, "#clients tbody tr:first-child td.retrans")
        top = json.loads(get(base + "/traffic?limit=1"))["clients"]
        if not cells or not top or cells[0].text == "":
            return False
        ratio = top[0]["retransmission_ratio"]
        if ratio is None:
            return cells[0].text == "–"
        # one decimal, rounded by JavaScript's toFixed (ties may go the other way than Python's)
        return cells[0].text.endswith("%") and abs(float(cells[0].text[:-1]) - ratio * 100) <= 0.0501

    assert wait_for(same_retransmission_cell, "the first client's Retrans cell to equal /traffic's ratio")


def test_dashboard_draws_the_throughput_chart_and_protocol_bars(browser, dashboard):
    assert series_pixels(browser) > 100
    assert browser.find_element(By.ID, "throughput-empty").get_attribute("hidden") is not None
    # read in one script: the bars are redrawn every second, so found elements may go stale
    names = browser.execute_script(
        "return [...document.querySelectorAll('#protocols .name')].map(cell => cell.textContent)")
    assert sorted(names) == sorted(["HTTP", "HTTPS", "FTP", "SSH", "DNS", "OTHER"])
    assert browser.find_element(By.ID, "servers").text == "192.0.2.10, 2001:db8::10"
    assert browser.find_element(By.ID, "capture-state").text == "replaying"


def test_dashboard_logs_no_console_errors(dashboard):
    assert [entry for entry in dashboard if entry["level"] == "SEVERE"] == []


def test_dashboard_screenshot(exporter, browser, dashboard):
    """Written to artifacts/; with UPDATE_SCREENSHOT=1 also to docs/dashboard.png, after more of the replay."""
    update = os.environ.get("UPDATE_SCREENSHOT") == "1"
    if update:
        started = exporter[2]
        time.sleep(max(0.0, SCREENSHOT_REPLAY_SECONDS - (time.monotonic() - started)))
        time.sleep(2.5)  # one more poll
    height = browser.execute_script(  # the whole page, no more: the window also holds some browser frame
        "return Math.ceil(document.body.getBoundingClientRect().bottom) + window.outerHeight - window.innerHeight")
    browser.set_window_size(1280, height)
    wait_for(lambda: series_pixels(browser) > 100, "the chart redrawn at the new size", timeout=10)
    ARTIFACT.parent.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACT))
    if update:
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(ARTIFACT, DOCS_SCREENSHOT)


def test_dashboard_shows_an_error_banner_while_the_api_is_unreachable(browser, dashboard):
    banner = browser.find_element(By.ID, "error-banner")
    assert not banner.is_displayed()
    browser.execute_cdp_cmd("Network.enable", {})
    offline = {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    try:
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", offline)
        wait_for(banner.is_displayed, "the error banner", timeout=10)
        assert "unreachable" in banner.text
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", {**offline, "offline": False})
        wait_for(lambda: not banner.is_displayed(), "the error banner to clear", timeout=10)
    finally:
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", {**offline, "offline": False})
        browser.get_log("browser")  # the failed requests logged errors on purpose


# --- who the clients are: the demo with an ASN and a country database ---------------------------

HOSTILE_ORG = '<img src=x onerror="window.pwned=1">Evil & Co'


@pytest.fixture(scope="module")
def geoip_exporter():
    """The demo with --geoip-db (files readable by nobody); 198.51.100.0/28's organisation is markup."""
    import tempfile

    from tests.geoip_databases import ASN_RECORDS, COUNTRY_RECORDS, write_database

    directory = Path(tempfile.mkdtemp(prefix="te-geoip-"))
    try:
        directory.chmod(0o755)
        records = {**ASN_RECORDS, "198.51.100.0/28": {"autonomous_system_number": 64511,
                                                      "autonomous_system_organization": HOSTILE_ORG}}
        databases = [write_database(directory / "asn.mmdb", records, "GeoLite2-ASN"),
                     write_database(directory / "country.mmdb", COUNTRY_RECORDS, "GeoLite2-Country")]
        for path in databases:
            path.chmod(0o644)
        wrapper = unprivileged_wrapper() if os.geteuid() == 0 else []
        with running_exporter(["--demo", "--geoip-db", ",".join(map(str, databases))], command=wrapper,
                              cwd=REPO_ROOT) as (base, _process):
            yield base
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_dashboard_shows_what_the_databases_say_of_each_client_as_text(geoip_exporter, browser):
    browser.get(geoip_exporter + "/dashboard")

    def rows():  # read in one script: the table is re-rendered every poll
        return dict(browser.execute_script("""
            return [...document.querySelectorAll("#clients tbody td.client")].map((cell) => {
              const facts = cell.querySelector(".client-facts");
              return [cell.firstChild.textContent, facts ? facts.textContent : ""];
            });"""))

    shown = wait_for(lambda: (found := rows()) and "198.51.100.7" in found and found, "clients with their AS")
    reported = {c["ip"]: c for c in json.loads(get(geoip_exporter + "/traffic?limit=10"))["clients"]}
    for ip, facts in shown.items():
        entry = reported.get(ip)
        if entry is None:  # the table and /traffic were read a poll apart
            continue
        expected = " · ".join(part for part in (
            " ".join(str(p) for p in (f"AS{entry['asn']}" if "asn" in entry else "", entry.get("as_org", "")) if p),
            entry.get("country", "")) if part)
        assert facts == expected, ip
    assert shown["198.51.100.7"] == f"AS64511 {HOSTILE_ORG} · DE"  # the markup shown as text
    assert browser.find_elements(By.CSS_SELECTOR, "#clients img") == []
    assert browser.execute_script("return window.pwned === undefined")
