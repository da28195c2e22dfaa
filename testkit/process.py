"""Run the real exporter as a subprocess on a free loopback port, for end-to-end tests."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Iterator, Optional, Sequence


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def terminate(process: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate a process we started, then kill it if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


@contextlib.contextmanager
def running_exporter(args: Sequence[str], *, command: Sequence[str] = (), ready_timeout: float = 20.0,
                     ready_path: Optional[str] = "/metrics", **popen) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``python -m exporter ARGS --listen 127.0.0.1:PORT``; yield its base URL and process; always stop it.

    Ready means ``ready_path`` answers; with None, that the port accepts connections (e.g. behind auth).

    Its output goes to a file, not a pipe: an unread pipe fills up and then blocks the server's logging.
    """
    port = free_port()
    argv = [*command, sys.executable, "-m", "exporter", *args, "--listen", f"127.0.0.1:{port}"]
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, **popen)
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                if process.poll() is not None:
                    output.seek(0)
                    raise AssertionError(f"exporter exited with {process.returncode}: {output.read().decode()[-2000:]}")
                try:
                    if ready_path is None:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    else:
                        get(base + ready_path, timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError("exporter did not answer in time") from None
                    time.sleep(0.1)
            yield base, process
        finally:
            terminate(process)
