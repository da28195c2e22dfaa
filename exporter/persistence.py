"""``--state-file``: save counters and history atomically, restore them at start-up.

A missing, corrupt or incompatible file gives a warning and a fresh start, never a crash.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from typing import Callable, Optional

log = logging.getLogger(__name__)

FORMAT = "traffic-exporter-state"
VERSION = 3
# version 1 (no exact totals, no idle times) and 2 (no TCP health) are read for upgrades
READABLE_VERSIONS = (1, 2, 3)


def save_state(path: str, parts: dict) -> None:
    """Write ``parts`` to ``path`` atomically: temporary file, fsync, rename, fsync of the directory."""
    document = {"format": FORMAT, "version": VERSION, "saved_at": time.time(), **parts}
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=TEMPORARY_SUFFIX, dir=directory)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(document, file, separators=(",", ":"))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    directory_descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_descriptor)
    finally:
        os.close(directory_descriptor)


TEMPORARY_SUFFIX = ".tmp"


def _temporary_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def remove_stale_temporaries(path: str) -> None:
    """Delete temporary files a save of ``path`` left behind when the process was killed mid-save."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = _temporary_prefix(path)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(TEMPORARY_SUFFIX):
            try:
                os.unlink(os.path.join(directory, name))
                log.info("removed %s, left by an interrupted save", name)
            except OSError as error:
                log.warning("cannot remove %s, left by an interrupted save: %s", name, error.strerror)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a number a counter can hold")


def load_state(path: str) -> Optional[dict]:
    """The saved document, or None (with a warning) when it is missing, corrupt or incompatible."""
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file, parse_constant=_no_constants)
    except FileNotFoundError:
        log.info("state file %s does not exist yet; starting fresh", path)
        return None
    except (OSError, ValueError, RecursionError) as error:
        log.warning("state file %s is unreadable (%s); starting fresh", path, error)
        return None
    if not isinstance(document, dict) or document.get("format") != FORMAT \
            or document.get("version") not in READABLE_VERSIONS:
        log.warning("state file %s is not a version %d %s file; starting fresh", path, VERSION, FORMAT)
        return None
    return document


def restore(path: str, preparers: dict[str, Callable[[object], Callable[[], None]]]) -> bool:
    """Load ``path``, check every part with its preparer, then apply them all, or none (with a warning).

    Temporary files that an interrupted save of ``path`` left are removed first.
    """
    remove_stale_temporaries(path)
    document = load_state(path)
    if document is None:
        return False
    try:
        appliers = [prepare(document[name]) for name, prepare in preparers.items()]
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as error:
        log.warning("state file %s has unexpected content (%s: %s); starting fresh",
                    path, type(error).__name__, error)
        return False
    for apply in appliers:
        apply()
    log.info("restored counters and history from %s", path)
    return True


class PeriodicSaver:
    """Saves the state every ``interval`` seconds on a thread, and once more when stopped."""

    def __init__(self, path: str, collect: Callable[[], dict], interval: float = 60.0):
        self.path = path
        self.collect = collect
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-saver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and write a last time."""
        self._stop.set()
        self._thread.join(5)
        self.save()

    def save(self) -> None:
        started = time.monotonic()
        try:
            save_state(self.path, self.collect())
        except OSError as error:  # a full disk must not stop the exporter
            log.warning("cannot save state to %s: %s", self.path, error)
            return
        took = time.monotonic() - started
        if took > self.interval / 4:
            log.warning("saving state to %s took %.1f s of its %.0f s interval", self.path, took, self.interval)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.save()
