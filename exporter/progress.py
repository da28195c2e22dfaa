"""Progress of long offline work on a terminal (one line, rewritten in place, cleared at the end); bytes for people."""
from __future__ import annotations

import os
import time
from typing import Callable, Optional, TextIO

PROGRESS_AFTER_SECONDS = 1.0  # work done sooner shows nothing

PROGRESS_EVERY_SECONDS = 0.25

CLEAR_LINE = "\r\x1b[K"  # back to the start of the line, and erase it (ANSI "erase in line")


class Progress:
    """A status line on a terminal: frames, bytes, rate and, for a file of known size, the time left.

    ``update`` is cheap until an update is due (call it per batch): nothing shows before
    PROGRESS_AFTER_SECONDS, then the line is rewritten every PROGRESS_EVERY_SECONDS.
    """

    def __init__(self, terminal: TextIO, total_bytes: Optional[int], clock: Callable[[], float] = time.monotonic):
        self.terminal = terminal
        self.total_bytes = total_bytes
        self._clock = clock
        self._started = clock()
        self._due = self._started + PROGRESS_AFTER_SECONDS
        self._shown = False

    def update(self, frames: int, bytes_read: int) -> None:
        """Show ``frames`` read so far and ``bytes_read`` of the input, if an update is due."""
        now = self._clock()
        if now < self._due:
            return
        self._due = now + PROGRESS_EVERY_SECONDS
        self._shown = True
        line = progress_line(frames, bytes_read, now - self._started, self.total_bytes)
        self.terminal.write(CLEAR_LINE + line[:self._width() - 1])  # a wrapped line could not be rewritten
        self.terminal.flush()

    def clear(self) -> None:
        """Erase the line, if it was shown."""
        if self._shown:
            self.terminal.write(CLEAR_LINE)
            self.terminal.flush()
            self._shown = False

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self.terminal.fileno()).columns or 80
        except (OSError, ValueError):
            return 80


def progress_on(terminal: TextIO, total_bytes: Optional[int]) -> Optional[Progress]:
    """A ``Progress`` on ``terminal`` if it is one, else None (a pipe or a file gets no progress lines)."""
    try:
        return Progress(terminal, total_bytes) if terminal.isatty() else None
    except ValueError:  # closed
        return None


def progress_line(frames: int, bytes_read: int, elapsed: float, total_bytes: Optional[int]) -> str:
    """'1,200,000 frames  480.0 MiB of 1.0 GiB (47%)  ETA 0:01  2,400,000 frames/s  960.0 MiB/s'.

    The rates come last: a narrow terminal cuts them first.
    """
    parts = [f"{frames:,} frames"]
    if total_bytes:
        parts.append(f"{human_bytes(bytes_read)} of {human_bytes(total_bytes)} ({100 * bytes_read // total_bytes}%)")
        if bytes_read and elapsed > 0:
            parts.append(f"ETA {_duration(elapsed * (total_bytes - bytes_read) / bytes_read)}")
    else:
        parts.append(human_bytes(bytes_read))
    if elapsed > 0:
        parts.append(f"{frames / elapsed:,.0f} frames/s")
        parts.append(f"{human_bytes(bytes_read / elapsed)}/s")
    return "  ".join(parts)


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    """65 -> '1:05', 3700 -> '1:01:40'."""
    minutes, seconds = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02}:{seconds:02}" if hours else f"{minutes}:{seconds:02}"
