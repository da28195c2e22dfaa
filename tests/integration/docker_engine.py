"""A Docker engine for the container tests, and the base image the Dockerfile names when no registry has it.

``docker_engine()`` uses the running engine, or starts Debian's ``dockerd`` (package docker.io) for
the session and stops it afterwards. That engine leaves the host's firewall and IP forwarding alone
(``--iptables=false --ip-forward=false``): containers reach nothing but this machine, and builds use
the host's network to reach the package mirrors and index.

``ensure_base_image()`` keeps an image already present (the real one, or the stand-in from an
earlier run), tries to pull it, and otherwise builds a stand-in: Debian bookworm minbase with
python3 made by ``debootstrap``, carrying the host's CA bundle and pip's ``cert`` setting (pip
reaches the package index only through that bundle here), imported under the same name.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
ENGINE_START_TIMEOUT = 60
STAND_IN_LABEL = 'org.opencontainers.image.description="local stand-in: Debian bookworm minbase with python3 (debootstrap)"'
# What the official Debian images configure and a debootstrap tree lacks: no apt caches left in layers.
DOCKER_CLEAN_APT = ('DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'
                    'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'
                    'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\n')
APT_SOURCES = ("deb http://deb.debian.org/debian bookworm main\n"
               "deb http://deb.debian.org/debian bookworm-updates main\n"
               "deb http://deb.debian.org/debian-security bookworm-security main\n")


def docker(*args: str, timeout: float = 120, check: bool = True, input: Optional[bytes] = None
           ) -> subprocess.CompletedProcess:
    """Run the docker client; on failure the error shows its output."""
    result = subprocess.run(["docker", *args], capture_output=True, timeout=timeout, input=input, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout.decode(errors='replace')[-4000:]}\n"
                             f"{result.stderr.decode(errors='replace')[-4000:]}")
    return result


def engine_answers() -> bool:
    return shutil.which("docker") is not None and docker("info", timeout=30, check=False).returncode == 0


def engine_unavailable_reason() -> Optional[str]:
    """Why no engine can be had (no client, no daemon to start, not root), or None."""
    if shutil.which("docker") is None:
        return "the docker client is not installed (Debian package docker.io; scripts/install.sh --test)"
    if engine_answers():
        return None
    if shutil.which("dockerd") is None:
        return "no Docker engine runs and dockerd is not installed (Debian package docker.io)"
    if os.geteuid() != 0:
        return "no Docker engine runs, and starting dockerd needs root"
    return None


@contextlib.contextmanager
def docker_engine(log_path: Path) -> Iterator[None]:
    """A Docker engine for the block: the running one, or dockerd started here and stopped on exit."""
    if engine_answers():
        yield
        return
    had_bridge = Path("/sys/class/net/docker0").exists()
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(["dockerd", "--iptables=false", "--ip-forward=false"], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + ENGINE_START_TIMEOUT
        while not engine_answers():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        daemon.send_signal(signal.SIGTERM)  # dockerd stops its containers and its containerd
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(10)
        if not had_bridge:
            subprocess.run(["ip", "link", "del", "docker0"], capture_output=True, timeout=20, check=False)


def image_exists(name: str) -> bool:
    return docker("image", "inspect", name, check=False, timeout=30).returncode == 0


def ensure_base_image(name: str, work_dir: Path) -> str:
    """Make ``name`` (a Debian bookworm image with python3) available; say how it was had."""
    if image_exists(name):
        return "present"
    if docker("pull", name, check=False, timeout=300).returncode == 0:
        return "pulled"
    build_stand_in(name, work_dir)
    return "built with debootstrap"


def build_stand_in(name: str, work_dir: Path) -> None:
    """debootstrap a bookworm minbase with python3 and venv, and import it as ``name``."""
    if shutil.which("debootstrap") is None:
        raise AssertionError(f"{name} cannot be pulled and debootstrap is not installed (Debian package debootstrap)")
    root = Path(tempfile.mkdtemp(prefix="base-", dir=work_dir))
    try:
        result = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv",
                                 "bookworm", str(root)], capture_output=True, timeout=900, check=False)
        assert result.returncode == 0, f"debootstrap failed:\n{result.stdout.decode()[-3000:]}{result.stderr.decode()}"
        # What the official slim images leave out too: downloaded packages, package lists, documentation.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                         "usr/share/locale"):
            for entry in (root / leftover).iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    if entry.name != "partial":
                        shutil.rmtree(entry)
                else:
                    entry.unlink()
        for cache in (root / "var/cache/apt").glob("*.bin"):
            cache.unlink()
        (root / "etc/apt/sources.list").write_text(APT_SOURCES)
        (root / "etc/apt/apt.conf.d/docker-clean").write_text(DOCKER_CLEAN_APT)
        shutil.copyfile(HOST_CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
        (root / "etc/pip.conf").write_text(f"[global]\ncert = {HOST_CA_BUNDLE}\n")
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["docker", "import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--change", "ENV LANG=C.UTF-8", "--change", f"LABEL {STAND_IN_LABEL}", "--change", 'CMD ["python3"]',
             "-", name], stdin=tar.stdout, capture_output=True, timeout=600, check=False)
        tar.stdout.close()
        tar.wait(60)
        assert imported.returncode == 0, f"docker import failed: {imported.stderr.decode()}"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def build_image(tag: str, context: Path, *, dockerfile: Optional[Path] = None, timeout: float = 900) -> None:
    """``docker build`` on the host network (the engine gives its bridge no way out)."""
    argv = ["build", "--network", "host", "--tag", tag]
    if dockerfile is not None:
        argv += ["--file", str(dockerfile)]
    docker(*argv, str(context), timeout=timeout)


def remove_containers(names: Sequence[str]) -> None:
    for name in names:
        docker("rm", "--force", "--volumes", name, check=False, timeout=60)
