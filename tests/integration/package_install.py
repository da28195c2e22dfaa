"""Install the project as a package from a clean copy of the work tree, as a fresh clone would."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 600
# What a package build must not see: VCS data, environments, caches, and a walker built by install.sh.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "artifacts", "__pycache__", ".pytest_cache", ".hypothesis",
                                    ".ruff_cache", ".schemathesis", "build", "dist", "*.egg-info", "*.so")


def run(argv: Sequence, *, cwd: Path, timeout: float = 120, env: dict | None = None) -> str:
    """Run a command; its stdout, or an AssertionError showing its output."""
    result = subprocess.run([str(arg) for arg in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=env, check=False)
    assert result.returncode == 0, (f"{' '.join(map(str, argv))} exited {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def copy_source_tree(destination: Path) -> Path:
    """A copy of the work tree without build output (so the package must build the walker itself)."""
    shutil.copytree(REPO_ROOT, destination, ignore=NOT_SOURCE)
    return destination


def pip_install(python: str | Path, environment: Path, source: Path) -> Path:
    """A new virtual environment made by ``python``, with ``pip install SOURCE``; returns its bin directory."""
    run([python, "-m", "venv", environment], cwd=source)
    run([environment / "bin" / "pip", "install", "--quiet", "."], cwd=source, timeout=INSTALL_TIMEOUT)
    return environment / "bin"
