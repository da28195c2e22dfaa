"""The Python package: ``pip install .`` and ``pipx install .`` in fresh environments give a working exporter.

Each install runs from a copy of the work tree without any built walker (so the package must build
``exporter/native/walk.c`` itself, and no build output lands in the tree), into a new virtual
environment, and the installed program runs from a directory outside the tree, so nothing is
imported from the clone. Needs the package index that pip is configured with (dependencies, and
setuptools for the build) and a C compiler (scripts/install.sh installs gcc).
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import venv
from pathlib import Path
from typing import Iterator, Sequence

import pytest
from packaging.requirements import Requirement

import exporter
from testkit.process import free_port, get, terminate
from tests.integration.package_install import (
    INSTALL_TIMEOUT,
    REPO_ROOT,
    copy_source_tree,
    pip_install,
    run,
)

pytestmark = pytest.mark.integration

PIPX_VERSION = "1.18.4"


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    return copy_source_tree(tmp_path_factory.mktemp("source") / "traffic-exporter")


@pytest.fixture(scope="module")
def pip_installed(tmp_path_factory, source_tree) -> Path:
    """``pip install .`` into a new virtual environment; returns the environment's bin directory."""
    return pip_install(sys.executable, tmp_path_factory.mktemp("pip") / "venv", source_tree)


@pytest.fixture(scope="module")
def pipx_installed(tmp_path_factory, source_tree) -> Path:
    """``pipx install .`` with pipx (from the package index) in a throw-away environment; returns the app's venv."""
    home = tmp_path_factory.mktemp("pipx")
    tools = home / "tools"
    venv.create(tools, with_pip=True)
    run([tools / "bin" / "pip", "install", "--quiet", f"pipx=={PIPX_VERSION}"], cwd=home, timeout=INSTALL_TIMEOUT)
    env = {"PATH": f"{tools / 'bin'}:/usr/bin:/bin", "HOME": str(home), "PIPX_HOME": str(home / "pipx"),
           "PIPX_BIN_DIR": str(home / "bin"), "PIPX_MAN_DIR": str(home / "man")}
    run([tools / "bin" / "pipx", "install", "."], cwd=source_tree, timeout=INSTALL_TIMEOUT, env=env)
    assert (home / "bin" / "traffic-exporter").exists(), "pipx put no traffic-exporter on its PATH"
    return home / "pipx" / "venvs" / "traffic-exporter"


def installed_python(bin_dir: Path, code: str, cwd: Path) -> str:
    return run([bin_dir / "python", "-c", code], cwd=cwd).strip()


def summarize_json(argv: Sequence, cwd: Path) -> dict:
    return json.loads(run([*argv, "summarize", "--format", "json", REPO_ROOT / "exporter" / "data" / "demo.pcap"],
                          cwd=cwd))


@contextlib.contextmanager
def serving(argv: Sequence, cwd: Path, timeout: float = 20) -> Iterator[str]:
    """Run a server command with ``--listen 127.0.0.1:PORT`` until ``/metrics`` answers; yield its base URL."""
    port = free_port()
    process = subprocess.Popen([*argv, "--listen", f"127.0.0.1:{port}"], cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, f"{argv[0]} exited with {process.returncode}"
            try:
                get(base + "/metrics", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, f"{argv[0]} did not answer within {timeout} s"
                time.sleep(0.2)
        yield base
    finally:
        terminate(process)


# --------------------------------------------------------------------------- pip install .


def test_pip_install_gives_the_traffic_exporter_command_with_the_same_results(pip_installed, tmp_path):
    installed = summarize_json([pip_installed / "traffic-exporter"], cwd=tmp_path)
    from_clone = summarize_json([sys.executable, "-m", "exporter"], cwd=REPO_ROOT)
    assert installed == from_clone
    assert installed["clients"], "the demo capture counted no client"


def test_pip_installed_package_builds_and_uses_the_native_walker(pip_installed, tmp_path):
    where, native = installed_python(
        pip_installed, "import exporter, exporter.walk; print(exporter.__file__); print(exporter.walk.native())",
        cwd=tmp_path).splitlines()
    assert Path(where).is_relative_to(pip_installed.parent), f"imported {where}, not the installed package"
    assert native == "True"


def test_pip_installed_package_holds_only_the_exporter_and_its_data(pip_installed, tmp_path):
    listing = json.loads(installed_python(
        pip_installed, "import json; from importlib import metadata; "
                       "print(json.dumps([str(f) for f in metadata.files('traffic-exporter')]))", cwd=tmp_path))
    # Entries outside site-packages (``../../../bin/traffic-exporter``) are the console script.
    top_level = {Path(name).parts[0] for name in listing} - {".."}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"exporter", "compat_api"}
    assert {"exporter/data/demo.pcap", "compat_api/openapi.json", "compat_api/static/dashboard.html",
            "compat_api/static/dashboard.js", "compat_api/static/dashboard.css"} <= set(listing)
    assert any(name.startswith("exporter/native/walk") and name.endswith(".so") for name in listing)


def test_pip_installed_version_is_the_one_in_exporter_init(pip_installed, tmp_path):
    version = installed_python(pip_installed, "from importlib import metadata; print(metadata.version('traffic-exporter'))",
                               cwd=tmp_path)
    assert version == exporter.__version__


def test_pip_installed_demo_serves_dashboard_api_and_metrics(pip_installed, tmp_path):
    with serving([pip_installed / "traffic-exporter", "--demo"], cwd=tmp_path) as base:
        page = get(base + "/dashboard").decode()
        assert "static/dashboard.js" in page
        assert b"historySeconds" in get(base + "/static/dashboard.js")
        assert get(base + "/static/dashboard.css")
        assert json.loads(get(base + "/openapi.json"))["openapi"].startswith("3.0")
        metrics = get(base + "/metrics").decode()
        assert f'version="{exporter.__version__}"' in metrics
        deadline = time.monotonic() + 15
        while not json.loads(get(base + "/traffic?seconds=60"))["clients"]:
            assert time.monotonic() < deadline, "the demo replay counted nothing"
            time.sleep(0.5)


def test_runtime_dependencies_match_the_pinned_requirements():
    import tomllib

    declared = {Requirement(text).name: Requirement(text)
                for text in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    lines = (REPO_ROOT / "requirements.txt").read_text().split("# tests")[0].splitlines()
    pinned = {Requirement(line).name: Requirement(line) for line in lines if line.strip() and not line.startswith("#")}
    assert set(declared) == set(pinned), "pyproject.toml and the runtime part of requirements.txt name different packages"
    for name, requirement in pinned.items():
        (version,) = [spec.version for spec in requirement.specifier]
        assert declared[name].specifier.contains(version), f"{name}=={version} is outside pyproject's {declared[name]}"


# --------------------------------------------------------------------------- pipx install .


def test_pipx_install_gives_a_working_command_with_the_native_walker(pipx_installed, tmp_path):
    command = pipx_installed.parent.parent.parent / "bin" / "traffic-exporter"
    assert summarize_json([command], cwd=tmp_path) == summarize_json([sys.executable, "-m", "exporter"], cwd=REPO_ROOT)
    assert installed_python(pipx_installed / "bin", "import exporter.walk; print(exporter.walk.native())",
                            cwd=tmp_path) == "True"
