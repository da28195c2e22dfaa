"""Where each record of a chain of length-prefixed records starts: pcap records, ring frames.

No array code can find them, since each record's place depends on the length in the one before it,
and a Python loop costs ~300 ns a record on a small machine. ``native/walk.c``, built by
``scripts/install.sh`` into ``native/walk.so`` (or by a package install, named with Python's
extension suffix), walks them at memory speed; without it (no compiler on the machine) the same
loops run in Python, and the exporter says so once.
"""
from __future__ import annotations

import ctypes
import logging
import struct
import sysconfig
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

NATIVE = Path(__file__).resolve().parent / "native"
# scripts/install.sh builds walk.so in a clone; pip builds it as an extension (walk.cpython-311-x86_64-linux-gnu.so).
LIBRARIES = (NATIVE / "walk.so", NATIVE / f"walk{sysconfig.get_config_var('EXT_SUFFIX')}")


def _load() -> Optional[ctypes.CDLL]:
    for path in LIBRARIES:
        try:
            library = ctypes.CDLL(str(path))
        except OSError:
            continue
        library.pcap_records.restype = ctypes.c_long
        library.pcap_records.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_long,
                                         ctypes.c_uint32, ctypes.c_void_p, ctypes.POINTER(ctypes.c_long),
                                         ctypes.c_void_p, ctypes.c_double]
        library.chained_records.restype = None
        library.chained_records.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
        return library
    log.info("walk.so is not built (scripts/install.sh builds it): walking capture records and tracking TCP "
             "flows in Python, several times slower (--tcp-health off spares the latter)")
    return None


_native = _load()


def native() -> bool:
    """Whether the records are walked by the compiled walker."""
    return _native is not None


def native_library() -> Optional[ctypes.CDLL]:
    """The compiled helpers (also ``collect_frame``, for libpcap), or None when they are not built."""
    return _native


def _address(buffer) -> int:
    return np.frombuffer(buffer, np.uint8).ctypes.data


def pcap_records(buffer, position: int, byte_order: str, limit: int, max_captured: int,
                 units: Optional[float] = None) -> tuple[np.ndarray, int, bool, Optional[np.ndarray]]:
    """Offsets of the classic pcap records from ``position`` that end inside ``buffer``, at most ``limit``.

    Returns (offsets, where the walk stopped, whether it stopped at a record whose captured length
    exceeds ``max_captured``: a corrupt file, and with ``units`` (timestamp fraction units per second)
    each record's time in seconds, else None). The walk reads each record header anyway, so its
    time costs next to nothing here.
    """
    if _native is not None:
        offsets = np.empty(limit, np.int64)
        times = np.empty(limit) if units else None
        stopped = ctypes.c_long()
        count = _native.pcap_records(_address(buffer), len(buffer), position, byte_order != "<", limit,
                                     max_captured, offsets.ctypes.data, ctypes.byref(stopped),
                                     None if times is None else times.ctypes.data, units or 1.0)
        corrupt = count < 0
        found = -1 - count if corrupt else count
        return offsets[:found], stopped.value, corrupt, None if times is None else times[:found]
    header = struct.Struct(byte_order + "III").unpack_from
    offsets, times, size, corrupt = [], [], len(buffer), False
    while len(offsets) < limit and position + 16 <= size:
        seconds, fraction, captured = header(buffer, position)
        if captured > max_captured:
            corrupt = True
            break
        if position + 16 + captured > size:
            break
        offsets.append(position)
        times.append(seconds + fraction / units if units else 0.0)
        position += 16 + captured
    return np.array(offsets, np.int64), position, corrupt, np.array(times) if units else None


def chained_records(buffer, first: int, count: int) -> np.ndarray:
    """Offsets of ``count`` records from ``first``, each starting with the native 32-bit distance to the next."""
    if _native is not None:
        offsets = np.empty(count, np.int64)
        _native.chained_records(_address(buffer), first, count, offsets.ctypes.data)
        return offsets
    distance = struct.Struct("=I").unpack_from
    offsets, position = [], first
    for _ in range(count):
        offsets.append(position)
        position += distance(buffer, position)[0]
    return np.array(offsets, np.int64)
