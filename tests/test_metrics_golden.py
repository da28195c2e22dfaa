"""The /metrics exposition of a fixed replay, byte for byte, against a checked-in golden file.

Any change of a metric name, label, HELP text or counted value shows up as a diff of
``tests/data/metrics.golden`` in review. After an intended change, refresh the file with

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_metrics_golden.py

and commit it with the change. Only the ``traffic_*`` families are kept (``process_*``, ``python_*``
and GC metrics vary from run to run and machine to machine), and the build's version labels are
replaced by a placeholder.
"""
from __future__ import annotations

import difflib
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric

from exporter.capture import Capture
from exporter.collector import build_registry
from exporter.config import serve_config
from exporter.startup import counting, open_source
from tests.builders import AFS_PCAP, AFS_SERVER

GOLDEN = Path(__file__).parent / "data" / "metrics.golden"
# afs.pcap has four clients: a cap of three puts the fourth to appear in "other".
REPLAY_ARGS = ["--pcap", str(AFS_PCAP), "--server-ip", AFS_SERVER, "--max-clients", "3"]
VERSION_PLACEHOLDER = "VERSION"


class StableFamilies:
    """The ``traffic_*`` families of a registry, with the build's version labels made constant."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if not family.name.startswith("traffic_"):
                continue
            if family.name == "traffic_exporter_build_info":
                family.samples = [sample._replace(labels=dict.fromkeys(sample.labels, VERSION_PLACEHOLDER))
                                  for sample in family.samples]
            yield family


def replayed_exposition() -> str:
    """What ``traffic-exporter`` with REPLAY_ARGS serves once the replay has ended (its stable part)."""
    config = serve_config(REPLAY_ARGS, environ={})
    capturing = open_source(config)
    counter, tally = counting(config, capturing.servers)
    capture = Capture(capturing.source, tally, counter)
    capture.start()
    capture.thread.join(30)
    assert not capture.thread.is_alive(), "the replay did not end within 30 s"
    # The file's name, not its path: the checkout's location must not change the text.
    status = replace(capture.status(), name=AFS_PCAP.name)
    registry = build_registry(tally, lambda: status, lambda: capturing.servers.addresses)
    return generate_latest(StableFamilies(registry)).decode()


@pytest.fixture(scope="module")
def exposition() -> str:
    return replayed_exposition()


def test_metrics_of_a_fixed_replay_equal_the_golden_file(exposition):
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(exposition)
        pytest.skip(f"UPDATE_GOLDEN is set: wrote {GOLDEN}; review it with git diff")
    expected = GOLDEN.read_text()
    if exposition != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True), exposition.splitlines(keepends=True),
                                            str(GOLDEN), "/metrics of the replay"))
        pytest.fail(f"/metrics differs from the golden file (if intended: UPDATE_GOLDEN=1 .venv/bin/python -m "
                    f"pytest tests/test_metrics_golden.py):\n{diff}", pytrace=False)


def test_the_golden_exposition_is_stable_run_to_run(exposition):
    assert replayed_exposition() == exposition


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed (Debian package prometheus)")
def test_the_golden_file_passes_promtool_check_metrics():
    result = subprocess.run(["promtool", "check", "metrics"], input=GOLDEN.read_bytes(), capture_output=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == b"" and result.stderr == b"", result
