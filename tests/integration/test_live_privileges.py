"""Start-up of live capture: no privileges, bad filter or interface, defaults, and dropping root with --user."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from testkit.live_traffic import REPO_ROOT, NamespacedExporter, dns_in_bytes, send_udp
from testkit.netns import namespace_pair, netns_unavailable_reason
from tests.integration.unprivileged import NOBODY, unprivileged_wrapper

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(netns_unavailable_reason() is not None,
                                 reason=netns_unavailable_reason() or ""),
              pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")]

CAP_NET_RAW_MASK = 1 << 13


def run_exporter(pair, *args: str, wrapper: list[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(pair.server_command(*wrapper, sys.executable, "-m", "exporter", *args,
                                              "--listen", "127.0.0.1:18001"),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def proc_status_path(path: str) -> dict[str, str]:
    with open(path) as file:
        return dict(line.split(":", 1) for line in file.read().splitlines() if ":" in line)


def proc_status(pid: int) -> dict[str, str]:
    return proc_status_path(f"/proc/{pid}/status")


@pytest.fixture(scope="module")
def pair():
    with namespace_pair() as created:
        yield created


def test_live_without_cap_net_raw_stops_with_one_line_and_exit_2(pair):
    result = run_exporter(pair, "--interface", pair.server_link, wrapper=unprivileged_wrapper())
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"traffic-exporter: cannot capture on {pair.server_link}: permission denied")
    for advice in ("CAP_NET_RAW", "sudo", "setcap cap_net_raw+ep", "cap_add: [NET_RAW]"):
        assert advice in lines[0]


def test_live_invalid_filter_stops_with_the_compiler_message_and_exit_2(pair):
    result = run_exporter(pair, "--interface", pair.server_link, "--filter", "tcp port 80 and and")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "traffic-exporter: --filter: invalid BPF filter 'tcp port 80 and and': "
        "can't parse filter expression: syntax error"]


def test_live_missing_interface_stops_with_one_line_and_exit_2(pair):
    result = run_exporter(pair, "--interface", "te-missing0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "traffic-exporter: --interface: no interface named 'te-missing0' (available: lo, te-srv0, any)"]


def test_live_unknown_user_stops_with_exit_2(pair):
    result = run_exporter(pair, "--interface", pair.server_link, "--user", "te-no-such-user")
    assert result.returncode == 2
    assert "--user: no such user" in result.stderr


def test_live_user_nobody_drops_root_after_opening_and_keeps_counting(pair):
    exporter = NamespacedExporter(pair, ["--interface", pair.server_link, "--user", "nobody"], port=18002)
    try:
        exporter.wait_ready()
        status = proc_status(exporter.process.pid)
        assert status["Uid"].split() == [str(NOBODY)] * 4
        assert status["Gid"].split() == [str(NOBODY)] * 4
        assert status["Groups"].strip() == ""
        assert int(status["CapEff"], 16) == CAP_NET_RAW_MASK  # only what reopening the socket needs
        assert int(status["CapPrm"], 16) == CAP_NET_RAW_MASK
        # Every thread (HTTP workers started before the switch, capture thread after it) is nobody,
        # with CAP_NET_RAW at most.
        threads = os.listdir(f"/proc/{exporter.process.pid}/task")
        assert len(threads) > 2
        for thread in threads:
            thread_status = proc_status_path(f"/proc/{exporter.process.pid}/task/{thread}/status")
            assert thread_status["Uid"].split() == [str(NOBODY)] * 4, thread_status["Name"]
            assert int(thread_status["CapEff"], 16) & ~CAP_NET_RAW_MASK == 0, thread_status["Name"]
            assert int(thread_status["CapPrm"], 16) & ~CAP_NET_RAW_MASK == 0, thread_status["Name"]
        send_udp(pair)
        exporter.wait_quiet()
        assert dns_in_bytes(exporter, pair) == 5 * (14 + 20 + 8 + 200)

        # Kept CAP_NET_RAW: the capture reopens its socket after the interface comes back.
        pair.delete_link()
        exporter.wait_until(lambda: exporter.value("traffic_exporter_capture_up") == 0, 10, "capture_up 0")
        pair.create_link()
        exporter.wait_until(lambda: exporter.value("traffic_exporter_capture_up") == 1, 40, "capture_up 1 again")
        send_udp(pair)
        exporter.wait_quiet()
        assert dns_in_bytes(exporter, pair) == 2 * 5 * (14 + 20 + 8 + 200)
        assert exporter.process.poll() is None
    finally:
        log = exporter.stop()
    assert "switched to user nobody keeping only CAP_NET_RAW" in log


def test_live_user_given_to_a_non_root_process_stops_with_exit_2(pair):
    result = run_exporter(pair, "--interface", pair.server_link, "--user", "nobody", wrapper=unprivileged_wrapper())
    assert result.returncode == 2
    assert "--user: switching users needs root" in result.stderr


def test_live_without_default_route_or_interface_stops_asking_for_interface(pair):
    assert "default" not in pair.server("ip", "route", "show").stdout
    assert "default" not in pair.server("ip", "-6", "route", "show").stdout
    result = run_exporter(pair)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "traffic-exporter: --interface: no default route to pick a capture interface from; pass --interface NAME"]


def root_with_default_route(pair, family: str, via: str, port: int) -> tuple[dict, str]:
    """``GET /`` and the log of an exporter started without flags while the server has a default route."""
    pair.server("ip", family, "route", "add", "default", "via", via)
    try:
        exporter = NamespacedExporter(pair, [], port=port)
        try:
            exporter.wait_ready()
            root = exporter.root()
        finally:
            log = exporter.stop()
    finally:
        pair.server("ip", family, "route", "del", "default")
    return root, log


def test_live_defaults_to_the_default_route_interface_and_its_addresses(pair):
    root, log = root_with_default_route(pair, "-4", pair.client_v4, 18003)
    assert root["server_ips"] == [pair.server_v4, pair.server_v6]
    assert root["capture"]["source"] == f"live:{pair.server_link}"
    assert (f"live capture on {pair.server_link} (holds the default route) through af_packet, server addresses "
            f"{pair.server_v4}, {pair.server_v6} (those of {pair.server_link})") in log


def test_live_defaults_use_the_ipv6_default_route_when_there_is_no_ipv4_one(pair):
    root, _log = root_with_default_route(pair, "-6", pair.client_v6, 18004)
    assert root["capture"]["source"] == f"live:{pair.server_link}"
