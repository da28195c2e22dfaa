"""Capture through libpcap: live on any platform libpcap (or Npcap) runs on, and capture files with a filter.

libpcap is reached through Scapy's ctypes binding (``scapy.libs.winpcapy``). Frames are collected by
``pcap_dispatch`` into one buffer per batch: with the compiled ``collect_frame`` (exporter/native)
as its callback, a whole dispatch runs without calling back into Python; without it, a Python
callback collects them one by one (slower, the same frames).
"""
from __future__ import annotations

import ctypes
import logging
import select
import threading
from typing import Iterator, Optional

import numpy as np

from .bpf import CAPTURE_SNAPLEN, FilterError
from .frames import FrameBatch, SourceError, check_link_type
from .interfaces import InterfaceNotFound, list_interfaces, not_found_message
from .privileges import CapturePermissionError, permission_message
from .walk import native_library

log = logging.getLogger(__name__)

READ_TIMEOUT_MS = 250  # a dispatch returns after this long without frames, as a ring block is retired
BATCH_BYTES = 4 << 20  # frame bytes collected per batch
BATCH_FRAMES = 16384
PCAP_ERROR_BUFFER = 256
# pcap_activate's results <pcap/pcap.h>
PCAP_ERROR_NO_SUCH_DEVICE = -5
PCAP_ERROR_PERM_DENIED = -8
PCAP_WARNING = 1


class _Collected(ctypes.Structure):
    """``struct collected`` of exporter/native/walk.c."""

    _fields_ = [("data", ctypes.c_void_p), ("capacity", ctypes.c_long), ("used", ctypes.c_long),
                ("limit", ctypes.c_long), ("count", ctypes.c_long), ("starts", ctypes.c_void_p),
                ("ends", ctypes.c_void_p), ("wire_lengths", ctypes.c_void_p), ("timestamps", ctypes.c_void_p)]


def _pcap():
    """Scapy's libpcap binding; SourceError when libpcap is not installed."""
    try:
        from scapy.libs import winpcapy
    except OSError as error:  # the library itself is missing
        raise SourceError(f"libpcap is not installed ({error}); install libpcap (Npcap on Windows)") from None
    return winpcapy


class _Collector:
    """Buffers a dispatch's frames land in, reused batch after batch, and the callback that fills them."""

    def __init__(self, frame_bytes: int):
        pcap = _pcap()
        self.frame_bytes = frame_bytes  # the most one frame can bring (the handle's snap length)
        self.data = np.empty(max(BATCH_BYTES, frame_bytes), np.uint8)
        self.starts, self.ends, self.wire_lengths = (np.empty(BATCH_FRAMES, np.int64) for _ in range(3))
        self.timestamps = np.empty(BATCH_FRAMES)
        self.state = _Collected(self.data.ctypes.data, len(self.data), 0, BATCH_FRAMES, 0, self.starts.ctypes.data,
                                self.ends.ctypes.data, self.wire_lengths.ctypes.data, self.timestamps.ctypes.data)
        library = native_library()
        if library is not None:
            self.callback = pcap.pcap_handler(ctypes.cast(library.collect_frame, ctypes.c_void_p).value)
        else:
            self.callback = pcap.pcap_handler(self._collect_in_python)

    def room(self) -> int:
        """How many frames the next dispatch may deliver without overflowing the buffers."""
        return min(BATCH_FRAMES - self.state.count, (len(self.data) - self.state.used) // self.frame_bytes)

    def _collect_in_python(self, _user, header, data) -> None:
        state, captured = self.state, header.contents.caplen
        index, used = state.count, state.used
        self.data[used:used + captured] = np.ctypeslib.as_array(data, (captured,))
        self.starts[index], self.ends[index] = used, used + captured
        self.wire_lengths[index] = header.contents.len
        self.timestamps[index] = header.contents.ts.tv_sec + header.contents.ts.tv_usec / 1e6
        state.used, state.count = used + captured, index + 1

    def dispatch(self, handle, frames: int) -> int:
        """Collect up to ``frames`` frames; pcap_dispatch's result (-1: error)."""
        return _pcap().pcap_dispatch(handle, frames, self.callback, ctypes.cast(ctypes.pointer(self.state),
                                                                                 ctypes.POINTER(ctypes.c_ubyte)))

    def take(self, link_type: int, timestamps: bool) -> FrameBatch:
        """The frames collected since the last take, as a batch over the buffers (valid until the next dispatch)."""
        count = self.state.count
        self.state.count = self.state.used = 0
        return FrameBatch(link_type, self.data, self.starts[:count].copy(), self.ends[:count].copy(),
                          self.wire_lengths[:count].copy(), self.timestamps[:count].copy() if timestamps else None)


def _error(handle) -> str:
    return _pcap().pcap_geterr(handle).decode(errors="replace")


def _set_filter(handle, expression: str, netmask: int = 0) -> None:
    """Compile ``expression`` for this handle and attach it; FilterError with libpcap's message."""
    pcap = _pcap()
    program = pcap.bpf_program()
    if pcap.pcap_compile(handle, ctypes.byref(program), expression.encode(), 1, netmask) != 0:
        raise FilterError(f"invalid BPF filter {expression!r}: {_error(handle)}")
    try:
        if pcap.pcap_setfilter(handle, ctypes.byref(program)) != 0:
            raise FilterError(f"cannot apply the BPF filter {expression!r}: {_error(handle)}")
    finally:
        pcap.pcap_freecode(ctypes.byref(program))


class LibpcapSource:
    """Frames of one interface (or ``any`` on Linux) through libpcap, promiscuous mode off.

    The handle is opened by the constructor, so start-up fails early on a missing interface, a bad
    filter or missing privileges. After an error ``batches`` opens it again.
    """

    kind = "live"
    restartable = True

    def __init__(self, interface: str, bpf_filter: str = "", *, buffer_bytes: int = 16 << 20,
                 timestamps: bool = False):
        self.name = interface
        self.timestamps = timestamps  # batches carry each frame's time (for TCP health)
        self.filter = bpf_filter
        self.buffer_bytes = buffer_bytes
        self._handle = None
        self._dropped = 0
        self._collector: Optional[_Collector] = None
        self._open()

    def _open(self) -> None:
        if self._handle is not None:
            return
        pcap = _pcap()
        errors = ctypes.create_string_buffer(PCAP_ERROR_BUFFER)
        handle = pcap.pcap_create(self.name.encode(), errors)
        if not handle:
            raise SourceError(f"{self.name}: {errors.value.decode(errors='replace')}")
        for setting, value in ((pcap.pcap_set_snaplen, CAPTURE_SNAPLEN), (pcap.pcap_set_promisc, 0),
                               (pcap.pcap_set_timeout, READ_TIMEOUT_MS), (pcap.pcap_set_buffer_size, self.buffer_bytes)):
            setting(handle, value)
        status = pcap.pcap_activate(handle)
        if status < 0:
            message = _error(handle) or pcap.pcap_statustostr(status).decode()
            pcap.pcap_close(handle)
            if status == PCAP_ERROR_PERM_DENIED:
                raise CapturePermissionError(permission_message(self.name))
            if status == PCAP_ERROR_NO_SUCH_DEVICE:
                raise InterfaceNotFound(not_found_message(self.name, list_interfaces()))
            raise SourceError(f"{self.name}: {message}")
        try:
            self.link_type = pcap.pcap_datalink(handle)
            check_link_type(self.link_type, self.name)
            if self.filter:
                _set_filter(handle, self.filter)
        except SourceError:
            pcap.pcap_close(handle)
            raise
        self._handle = handle
        self._collector = self._collector or _Collector(CAPTURE_SNAPLEN)
        log.debug("libpcap capture open on %s (link type %d, %s)", self.name, self.link_type,
                  pcap.pcap_lib_version().decode())

    def close(self) -> None:
        """Close the handle, keeping the drop count."""
        if self._handle is not None:
            self._read_drops()
            _pcap().pcap_close(self._handle)
            self._handle = None

    def kernel_dropped(self) -> int:
        """Frames libpcap reports dropped (by the kernel and by the interface), cumulative over reopenings."""
        return self._dropped + self._read_drops(keep=False)

    def _read_drops(self, keep: bool = True) -> int:
        if self._handle is None:
            return 0
        stats = _pcap().pcap_stat()
        if _pcap().pcap_stats(self._handle, ctypes.byref(stats)) != 0:
            return 0
        dropped = stats.ps_drop + stats.ps_ifdrop  # since the handle was opened
        if keep:
            self._dropped += dropped
        return dropped

    def batches(self, stop: threading.Event) -> Iterator[FrameBatch]:
        """Yield what each dispatch delivers; an empty batch after each idle read timeout.

        Where libpcap has a descriptor to wait on (not on Windows), the handle is non-blocking and
        this waits with poll(), so the thread sees ``stop`` (a blocking read may wait for the first
        frame well past its timeout); elsewhere it blocks for up to the read timeout.
        """
        self._open()
        collector, handle, pcap = self._collector, self._handle, _pcap()
        descriptor = pcap.pcap_get_selectable_fd(handle) if hasattr(pcap, "pcap_get_selectable_fd") else -1
        waiter = None
        if descriptor >= 0:
            errors = ctypes.create_string_buffer(PCAP_ERROR_BUFFER)
            pcap.pcap_setnonblock(handle, 1, errors)
            waiter = select.poll()
            waiter.register(descriptor, select.POLLIN)
        try:
            while not stop.is_set():
                if waiter is not None and not waiter.poll(READ_TIMEOUT_MS):
                    yield collector.take(self.link_type, timestamps=False)  # nothing: housekeeping
                    continue
                if collector.dispatch(handle, collector.room()) < 0:
                    raise SourceError(f"{self.name}: capture failed: {_error(handle)}")
                yield collector.take(self.link_type, timestamps=self.timestamps)
        finally:
            self.close()


def _open_file(path: str):
    pcap = _pcap()
    errors = ctypes.create_string_buffer(PCAP_ERROR_BUFFER)
    handle = pcap.pcap_open_offline(path.encode(), errors)
    if not handle:
        raise SourceError(f"{path}: {errors.value.decode(errors='replace')}")
    return handle


def check_filter(path: str, bpf_filter: str) -> None:
    """FilterError (libpcap's message) unless ``bpf_filter`` compiles for the file's link type."""
    handle = _open_file(path)
    try:
        _set_filter(handle, bpf_filter)
    finally:
        _pcap().pcap_close(handle)


def read_filtered(path: str, bpf_filter: str, timestamps: bool) -> Iterator[FrameBatch]:
    """The frames of a pcap or pcapng file that ``bpf_filter`` keeps, as libpcap reads and filters them."""
    pcap = _pcap()
    handle = _open_file(path)
    try:
        link_type = pcap.pcap_datalink(handle)
        check_link_type(link_type, path)
        _set_filter(handle, bpf_filter)
        collector = _Collector(max(pcap.pcap_snapshot(handle), CAPTURE_SNAPLEN))
        while True:
            result = collector.dispatch(handle, max(1, collector.room()))
            if result < 0:
                raise SourceError(f"{path}: {_error(handle)}")
            if result == 0 or collector.room() == 0:
                batch = collector.take(link_type, timestamps)
                if batch:
                    yield batch
                if result == 0:
                    return
    finally:
        pcap.pcap_close(handle)
