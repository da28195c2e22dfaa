"""Run a command as the unprivileged user nobody, for tests of what the exporter does without root."""
from __future__ import annotations

import subprocess
import sys

from testkit.live_traffic import REPO_ROOT

NOBODY = 65534


def unprivileged_wrapper() -> list[str]:
    """setpriv to nobody, without any capability that matters for capture.

    When the interpreter lives where nobody may not look (e.g. pyenv under /root), CAP_DAC_READ_SEARCH
    is passed along as an ambient capability so Python can start at all; it grants reading files,
    nothing about sockets.
    """
    base = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run([*base, sys.executable, "-c", "import exporter.cli, compat_api.app, waitress, scapy"],
                           cwd=REPO_ROOT, capture_output=True, timeout=30)
    if probe.returncode == 0:
        return base
    return [*base, "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
