"""`summarize` shows its progress on a terminal's stderr for work that takes more than a second, and only there."""
from __future__ import annotations

import contextlib
import fcntl
import io
import math
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from bench.generate import SERVER_V4, SERVER_V6, write_worst_case_pcap
from exporter import pcap as pcap_module, pcapng as pcapng_module
from exporter.decode import LINKTYPE_ETHERNET
from exporter.progress import (CLEAR_LINE, PROGRESS_AFTER_SECONDS, PROGRESS_EVERY_SECONDS, Progress, progress_line,
                               progress_on)
from exporter.replay import PcapSource
from tests.builders import AFS_PCAP, ManualClock
from tests.capture_files import Pcapng, pcap_header, udp_frames

SUMMARIZE = [sys.executable, "-m", "exporter", "summarize"]
SERVERS = ["--server-ip", SERVER_V4, "--server-ip", SERVER_V6]
LONG_SECONDS = 2.0  # a run this long shows several progress updates
MAX_COPIES = 40  # of 200,000 worst-case frames: 3.4 GB at most
# One update: back to the start of the line, erase it, the counts.
UPDATE = re.compile(re.escape(CLEAR_LINE) + r"([\d,]+) frames  ([^\r\x1b]*)")


def test_a_file_line_shows_frames_bytes_share_time_left_and_rates():
    line = progress_line(1_200_000, 512 << 20, 2.0, 2 << 30)
    assert line == "1,200,000 frames  512.0 MiB of 2.0 GiB (25%)  ETA 0:06  600,000 frames/s  256.0 MiB/s"
    assert progress_line(10, 3 << 30, 3700.0, 4 << 30).split("  ")[2] == "ETA 20:33"
    assert progress_line(10, 1 << 30, 3600.0, 4 << 30).split("  ")[2] == "ETA 3:00:00"


def test_a_stream_line_has_no_share_and_no_time_left():
    assert progress_line(3_000, 1536, 1.5, None) == "3,000 frames  1.5 KiB  2,000 frames/s  1.0 KiB/s"


def test_nothing_shows_before_a_second_then_a_few_updates_a_second_then_the_line_is_erased():
    terminal, clock = io.StringIO(), ManualClock()
    progress = Progress(terminal, 1000, clock)
    clock.now += PROGRESS_AFTER_SECONDS - 0.01
    progress.update(10, 100)
    assert terminal.getvalue() == ""
    clock.now += 0.01
    progress.update(20, 200)
    assert terminal.getvalue() == CLEAR_LINE + progress_line(20, 200, PROGRESS_AFTER_SECONDS, 1000)
    clock.now += PROGRESS_EVERY_SECONDS / 2
    progress.update(30, 300)  # too soon
    assert terminal.getvalue().count(CLEAR_LINE) == 1
    clock.now += PROGRESS_EVERY_SECONDS / 2
    progress.update(40, 400)
    assert terminal.getvalue() == (CLEAR_LINE + progress_line(20, 200, PROGRESS_AFTER_SECONDS, 1000) + CLEAR_LINE
                                   + progress_line(40, 400, PROGRESS_AFTER_SECONDS + PROGRESS_EVERY_SECONDS, 1000))
    progress.clear()
    assert terminal.getvalue().endswith("(40%)  ETA 0:02  32 frames/s  320 B/s" + CLEAR_LINE)


def test_work_done_within_a_second_leaves_nothing_on_the_terminal():
    terminal, clock = io.StringIO(), ManualClock()
    progress = Progress(terminal, None, clock)
    progress.update(5, 50)
    progress.clear()
    assert terminal.getvalue() == ""


def test_progress_goes_to_a_terminal_only(tmp_path):
    controller, terminal = pty.openpty()
    read_end, write_end = os.pipe()
    try:
        with open(terminal, "w", closefd=False) as on_terminal, open(write_end, "w", closefd=False) as on_pipe, \
                open(tmp_path / "log", "w") as on_file:
            assert isinstance(progress_on(on_terminal, None), Progress)
            assert progress_on(on_pipe, None) is None and progress_on(on_file, None) is None
    finally:
        for fd in (controller, terminal, read_end, write_end):
            os.close(fd)


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_a_file_replay_tells_how_far_it_has_read(monkeypatch, tmp_path, kind):
    """What the time left is computed from: bytes read grow batch by batch up to the file's size."""
    frames = [bytes(frame) for frame in udp_frames(50)] * 20
    path = tmp_path / f"frames.{kind}"
    if kind == "pcap":
        path.write_bytes(pcap_header(LINKTYPE_ETHERNET) + b"".join(
            struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame for frame in frames))
        monkeypatch.setattr(pcap_module, "MAP_WINDOW", 1 << 12)
    else:
        file = Pcapng()
        file.section()
        file.interface(LINKTYPE_ETHERNET)
        for frame in frames:
            file.enhanced(0, 0, frame)
        file.write(path)
        monkeypatch.setattr(pcapng_module, "READ_CHUNK", 1 << 12)
    monkeypatch.setattr(pcap_module, "BATCH_FRAMES", 100)
    source = PcapSource(str(path))
    assert source.size == path.stat().st_size and source.bytes_read() == 0
    seen = [source.bytes_read() for _ in source.batches(threading.Event())]
    assert len(set(seen)) >= 5 and seen == sorted(seen) and 0 < seen[0] and seen[-1] <= source.size
    assert source.bytes_read() == source.size


# -- summarize under a pseudo-terminal
@contextlib.contextmanager
def terminal_stderr(columns: int = 200) -> Iterator[tuple[int, list[bytes]]]:
    """A pseudo-terminal for a child's stderr: (its end for the child, what it shows, filled once the child is done).

    Close the child's end in the parent after starting the child, so the reader sees the end.
    """
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    shown: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: every end of the terminal is closed
                return
            if not data:
                return
            shown.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        yield terminal, shown
    finally:
        with contextlib.suppress(OSError):
            os.close(terminal)
        reader.join(10)
        os.close(controller)
        assert not reader.is_alive()


def summarize_on_terminal(args: list, stdin_data: Optional[list[bytes]] = None, pause: float = 0.0
                          ) -> tuple[subprocess.CompletedProcess, str]:
    """``summarize ARGS`` with stderr on a terminal: its result (stdout piped) and what the terminal showed.

    ``stdin_data``: pieces written to its stdin ``pause`` seconds apart.
    """
    with terminal_stderr() as (terminal, shown):
        process = subprocess.Popen([*SUMMARIZE, *map(str, args)], stdout=subprocess.PIPE, stderr=terminal,
                                   stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL)
        os.close(terminal)
        try:
            for piece in stdin_data or ():
                process.stdin.write(piece)
                process.stdin.flush()
                time.sleep(pause)
            if process.stdin:
                process.stdin.close()
            stdout = process.stdout.read()
            process.wait(120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, b""), b"".join(shown).decode()


def updates(shown: str) -> list[tuple[int, str]]:
    """(frames, the rest of the line) of each progress update the terminal showed."""
    return [(int(frames.replace(",", "")), rest) for frames, rest in UPDATE.findall(shown)]


@pytest.fixture(scope="module")
def long_capture(tmp_path_factory) -> Iterator[tuple[Path, subprocess.CompletedProcess]]:
    """A pcap of worst-case frames that `summarize` takes LONG_SECONDS or more to count here, and its piped run.

    The frames are repeated until counting them takes that long on this machine; the file is deleted after.
    """
    directory = tmp_path_factory.mktemp("long")
    frames = directory / "frames.pcap"
    write_worst_case_pcap(str(frames), 200_000)
    data = frames.read_bytes()
    frames.unlink()
    path, copies = directory / "long.pcap", 1
    try:
        while True:
            with open(path, "wb") as file:
                file.write(data[:24])
                for _ in range(copies):
                    file.write(memoryview(data)[24:])
            started = time.monotonic()
            piped = subprocess.run([*SUMMARIZE, path, *SERVERS], capture_output=True, timeout=300)
            elapsed = time.monotonic() - started
            if elapsed >= LONG_SECONDS or copies == MAX_COPIES:
                break
            copies = min(MAX_COPIES, math.ceil(copies * (LONG_SECONDS + 0.5) / elapsed))
        assert elapsed >= LONG_SECONDS, f"{copies * 200_000} frames counted in {elapsed:.1f} s"
        yield path, piped
    finally:
        path.unlink(missing_ok=True)


def test_summarize_on_a_terminal_shows_progress_in_place_and_the_same_table(long_capture):
    path, piped = long_capture
    result, shown = summarize_on_terminal([path, *SERVERS])
    assert result.returncode == 0 and result.stdout == piped.stdout
    assert piped.stdout.decode().startswith("CLIENT") and "frames; ignored" in piped.stdout.decode()
    seen = updates(shown)
    assert len(seen) >= 3, shown
    frames = [count for count, _ in seen]
    assert frames == sorted(frames) and frames[0] > 0 and frames[-1] > frames[0]
    for _, rest in seen:
        # the file grows until counting it takes LONG_SECONDS here: its size, and unit, depend on the machine
        assert re.fullmatch(r"[\d.]+ [KMG]iB of [\d.]+ [KMG]iB \(\d+%\)  ETA \d+:\d\d  [\d,]+ frames/s  [\d.]+ [KMG]iB/s",
                            rest), rest
    assert shown.endswith(CLEAR_LINE) and "\n" not in shown  # rewritten in place, erased at the end


def test_nothing_is_shown_when_stderr_is_a_pipe_or_with_json(long_capture):
    path, piped = long_capture
    assert piped.returncode == 0 and piped.stderr == b""
    result, shown = summarize_on_terminal([path, *SERVERS, "--format", "json"])
    assert result.returncode == 0 and result.stdout.startswith(b"{") and shown == ""


def test_a_slow_stream_shows_frames_and_rates_without_time_left():
    data = pcap_header(LINKTYPE_ETHERNET) + b"".join(
        struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame for frame in map(bytes, udp_frames(400)))
    pieces = [data[at:at + len(data) // 8 + 1] for at in range(0, len(data), len(data) // 8 + 1)]
    result, shown = summarize_on_terminal(["-", "--server-ip", "192.0.2.1", "--server-ip", "2001:db8::1"],
                                          pieces, pause=0.25)
    assert result.returncode == 0 and b" in 400 frames" in result.stdout
    seen = updates(shown)
    assert len(seen) >= 2, shown
    assert [count for count, _ in seen] == sorted(count for count, _ in seen)
    assert seen[0][0] < 400  # counted as it arrived, not at its end
    for _, rest in seen:
        assert re.fullmatch(r"[\d.]+ (B|KiB)  [\d,]+ frames/s  [\d.]+ (B|KiB)/s", rest), rest
    assert shown.endswith(CLEAR_LINE)


def test_a_short_summarize_on_a_terminal_shows_nothing():
    result, shown = summarize_on_terminal([AFS_PCAP, "--server-ip", "131.151.32.21"])
    assert result.returncode == 0 and result.stdout.startswith(b"CLIENT") and shown == ""
