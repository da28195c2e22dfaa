"""packaging/traffic-exporter.service and its environment file.

systemd does not run as PID 1 here, so the unit cannot be started. ``systemd-analyze verify`` and
``security --offline`` check the unit file itself; the privileges it gives are then reproduced
without systemd and shown to be enough for live capture: the installed package run as an
unprivileged user with CAP_NET_RAW as its only (ambient) capability, no_new_privs, and memory that
may not become executable (MemoryDenyWriteExecute), writing its state where StateDirectory= points.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from exporter.config import SERVE_OPTIONS, serve_config
from testkit.live_traffic import send_udp
from testkit.netns import namespace_pair, netns_unavailable_reason
from testkit.process import terminate
from tests.integration.package_install import REPO_ROOT, copy_source_tree, pip_install

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                 reason="systemd-analyze is not installed (Debian package systemd)")]

UNIT = REPO_ROOT / "packaging" / "traffic-exporter.service"
ENVIRONMENT_FILE = REPO_ROOT / "packaging" / "traffic-exporter.env"
INSTALLED_COMMAND = "/opt/traffic-exporter/bin/traffic-exporter"  # where the unit's header installs it
MAX_EXPOSURE = 2.0  # systemd-analyze security: 0 (locked down) .. 10 (unprotected)
NOBODY = 65534
CAP_NET_RAW = 13
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
ENVIRONMENT_LINE = re.compile(r"^#?((?:TRAFFIC_[A-Z0-9_]+|SERVER_IP))=(.*)$")


def unit_settings() -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120, check=False)


def test_unit_passes_systemd_analyze_verify(tmp_path):
    # verify also checks that ExecStart's program exists: point it at one that does, nothing else changes.
    assert unit_settings()["ExecStart"] == [INSTALLED_COMMAND]
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(f"ExecStart={INSTALLED_COMMAND}", f"ExecStart={shutil.which('true')}"))
    result = analyze("verify", str(unit))
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_unit_sandbox_exposure_is_low(record_property):
    result = analyze("security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT))
    exposure = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout).group(1))
    record_property("systemd_exposure", exposure)
    assert result.returncode == 0 and exposure <= MAX_EXPOSURE, result.stdout
    checks = {check["name"]: check["set"]
              for check in json.loads(analyze("security", "--offline=true", "--json=short", str(UNIT)).stdout)}
    for name in ("User=/DynamicUser=", "NoNewPrivileges=", "ProtectSystem=", "PrivateTmp=", "ProtectHome=",
                 "PrivateDevices=", "CapabilityBoundingSet=~CAP_SYS_ADMIN", "RestrictNamespaces=~net",
                 "MemoryDenyWriteExecute=", "SystemCallArchitectures="):
        assert checks[name], f"{name} is not locked down"


def test_unit_runs_a_dynamic_user_with_only_cap_net_raw_and_keeps_state_in_its_state_directory():
    settings = unit_settings()
    assert settings["DynamicUser"] == ["yes"]
    assert settings["AmbientCapabilities"] == settings["CapabilityBoundingSet"] == ["CAP_NET_RAW"]
    assert settings["ProtectSystem"] == ["strict"] and settings["NoNewPrivileges"] == ["yes"]
    environment = dict(value.split("=", 1) for value in settings["Environment"])
    (state_directory,) = settings["StateDirectory"]
    assert Path(environment["TRAFFIC_STATE_FILE"]).parent == Path("/var/lib") / state_directory
    assert settings["EnvironmentFile"] == ["-/etc/default/traffic-exporter"]


def test_environment_file_names_real_settings_with_valid_examples():
    known = {"SERVER_IP"} | {"TRAFFIC_" + flags[0].lstrip("-").upper().replace("-", "_")
                             for _dest, flags, _parse, _help in SERVE_OPTIONS}
    examples = [match.groups() for match in map(ENVIRONMENT_LINE.match, ENVIRONMENT_FILE.read_text().splitlines())
                if match]
    assert len(examples) >= 10
    for name, value in examples:
        assert name in known, f"{name} is not a setting of the exporter"
        serve_config([], environ={name: value})  # a ConfigError names the flag and the accepted values


# --------------------------------------------------------------------------- the unit's privileges, without systemd


@pytest.fixture(scope="module")
def world_readable_install() -> Iterator[Path]:
    """The package installed as the unit's header says, in a directory any user may read."""
    python = Path("/usr/bin/python3")
    if not python.exists():
        pytest.skip("Debian's /usr/bin/python3 is not installed (scripts/install.sh installs it)")
    root = Path(tempfile.mkdtemp(prefix="te-systemd-", dir="/tmp"))
    try:
        root.chmod(0o755)
        source = copy_source_tree(root / "source")
        yield pip_install(python, root / "traffic-exporter", source) / "traffic-exporter"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def memory_deny_write_execute_available() -> bool:
    """Whether this kernel has PR_SET_MDWE (Linux 6.3), tried in a child so this process is not affected."""
    code = f"import ctypes, sys; sys.exit(ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0))"
    probe = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


def as_the_unit_runs(command: list[str]) -> list[str]:
    """``command`` as nobody with CAP_NET_RAW as its only capability (ambient), no_new_privs, and MDWE."""
    sandboxed = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all,+net_raw",
                 "--ambient-caps=-all,+net_raw", "--bounding-set=-all,+net_raw", "--no-new-privs", *command]
    if not memory_deny_write_execute_available():
        return sandboxed
    launcher = ("import ctypes, os, sys; "
                f"assert ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0; "
                "os.execvp(sys.argv[1], sys.argv[1:])")
    return ["/usr/bin/python3", "-c", launcher, *sandboxed]


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, value in (line.split(":", 1) for line in lines if ":" in line)}


def scrape(pair, port: int) -> str:
    result = pair.server("curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/metrics", check=False)
    return result.stdout if result.returncode == 0 else ""


def sample(metrics: str, line_start: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


@contextlib.contextmanager
def state_directory() -> Iterator[Path]:
    """What StateDirectory= makes: a directory owned by the service's user, mode 0700."""
    parent = Path(tempfile.mkdtemp(prefix="te-state-", dir="/tmp"))
    try:
        parent.chmod(0o755)
        directory = parent / "traffic-exporter"
        directory.mkdir(mode=0o700)
        os.chown(directory, NOBODY, NOBODY)
        yield directory
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.skipif(netns_unavailable_reason() is not None, reason=netns_unavailable_reason() or "")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_unit_privileges_are_enough_to_capture_live_and_save_state(world_readable_install):
    port = 18_470  # on the server namespace's own loopback
    with namespace_pair() as pair, state_directory() as state:
        environment = {"PATH": "/usr/bin:/bin", "TRAFFIC_INTERFACE": pair.server_link,
                       "TRAFFIC_LISTEN": f"127.0.0.1:{port}", "TRAFFIC_STATE_FILE": str(state / "state.json")}
        process = subprocess.Popen(pair.server_command(*as_the_unit_runs([str(world_readable_install)])),
                                   env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while sample(scrape(pair, port), "traffic_exporter_capture_up") != 1:
                assert process.poll() is None, f"the exporter exited {process.returncode}: {process.stderr.read()}"
                assert time.monotonic() < deadline, "the capture did not come up within 30 s"
                time.sleep(0.2)
            status = proc_status(process.pid)  # ip netns exec, the launcher and setpriv each exec: one pid
            assert status["Uid"].split() == [str(NOBODY)] * 4
            for capabilities in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
                assert int(status[capabilities], 16) == 1 << CAP_NET_RAW, (capabilities, status[capabilities])
            assert status["NoNewPrivs"] == "1"
            send_udp(pair, count=5, size=200)
            frame = 14 + 20 + 8 + 200  # Ethernet, IPv4, UDP headers and the payload
            dns_in = f'traffic_client_bytes_total{{client="{pair.client_v4}",direction="in",protocol="DNS"}}'
            deadline = time.monotonic() + 10
            while sample(scrape(pair, port), dns_in) != 5 * frame:
                assert time.monotonic() < deadline, f"counted {sample(scrape(pair, port), dns_in)}, not {5 * frame}"
                time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0, process.stderr.read()
        finally:
            terminate(process)
        saved = state / "state.json"
        assert saved.exists(), "no state saved at exit"
        assert saved.stat().st_uid == NOBODY
