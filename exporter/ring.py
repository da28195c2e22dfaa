"""Live capture from a network interface through an AF_PACKET socket's TPACKET_V3 ring (packet(7),
the kernel's Documentation/networking/packet_mmap.rst).

Frames are read from a ring shared with the kernel, as libpcap reads them: the kernel fills blocks
of frames and hands a block over when it is full or after ``RING_RETIRE_MS``; one ``poll`` per
block, no system call and no copy per frame: a block is counted in place, then handed back. Only the
first ``CAPTURE_SNAPLEN`` bytes of a frame, its headers, reach the ring (the filter's return value),
so the ring holds many frames. What the kernel hands a packet socket differs from what was on the
wire in two ways, both accounted for as libpcap does:

- VLAN tags stripped by the NIC or by veth arrive out of band, in the frame's ``tpacket3_hdr``;
  their 4 bytes are counted in the frame's length.
- GRO/TSO aggregates can be far larger than the MTU; the frame's full length comes from ``tp_len``
  whatever was copied.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import select
import socket
import struct
import threading
from typing import Iterator, Optional

import numpy as np

from .bpf import ACCEPT_HEADERS, adapt_bpf_for_kernel, attach_bpf, compile_bpf
from .decode import (ETHERNET_HEADER_LENGTH, LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_RAW, SLL_HEADER_LENGTH,
                     VLAN_TAG_LENGTH)
from .frames import FrameBatch, SourceError
from .interfaces import (ANY_INTERFACE, ARPHRD_ETHER, ARPHRD_LOOPBACK, ARPHRD_NONE, ARPHRD_RAWIP, InterfaceNotFound,
                         list_interfaces, loopback_index, not_found_message)
from .privileges import CapturePermissionError, permission_message
from .walk import chained_records

log = logging.getLogger(__name__)

IDLE_SECONDS = 0.5
RING_BLOCK_BYTES = 4 << 20  # one block -> one batch: up to ~12k frames of headers
MINIMUM_RING_BYTES = 4 << 20  # the smallest ring asked for when the kernel is short of memory
MINIMUM_RING_BLOCKS = 8
RING_RETIRE_MS = 250  # a block is handed over after this long even if not full (tcpdump: 1000)

# <linux/if_ether.h>, <linux/if_packet.h>
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_FANOUT = 18
PACKET_FANOUT_HASH = 0  # by the flow's symmetric hash: both directions of a flow go to one socket
PACKET_FANOUT_FLAG_DEFRAG = 0x8000  # fragments are hashed whole, with their flow
PACKET_VERSION = 10

TPACKET_V3 = 2
PACKET_OUTGOING = 4
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 0x1
TP_STATUS_VLAN_VALID = 0x10

TPACKET_REQ3 = struct.Struct("=7I")  # block size, block count, frame size, frame count, retire ms, priv size, features

TPACKET_STATS_V3 = struct.Struct("=III")  # tp_packets, tp_drops, tp_freeze_q_cnt

# struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1 from offset 8
BLOCK_STATUS = struct.Struct("=I")  # block_status, at BLOCK_STATUS_OFFSET
BLOCK_STATUS_OFFSET = 8
BLOCK_PACKETS = struct.Struct("=4xII")  # num_pkts, offset_to_first_pkt, from BLOCK_STATUS_OFFSET

# struct tpacket3_hdr (48 bytes): tp_next_offset, tp_sec, tp_nsec, then these, native order
HEADER_SEC, HEADER_NSEC, HEADER_SNAPLEN, HEADER_LENGTH, HEADER_STATUS, HEADER_MAC, HEADER_VLAN_TCI = 4, 8, 12, 16, 20, 24, 32

# struct sockaddr_ll, at TPACKET_ALIGN(sizeof(struct tpacket3_hdr)) after each frame's header:
# family, protocol (network order), ifindex, hatype, pkttype
SOCKADDR_LL_OFFSET = 48
SOCKADDR_PROTOCOL, SOCKADDR_IFINDEX, SOCKADDR_PKTTYPE = 2, 4, 10
SOCKADDR_LL_END = SOCKADDR_LL_OFFSET + 20
RAW_LINK_TYPES = {ARPHRD_ETHER: LINKTYPE_ETHERNET, ARPHRD_LOOPBACK: LINKTYPE_ETHERNET,
                  ARPHRD_RAWIP: LINKTYPE_RAW, ARPHRD_NONE: LINKTYPE_RAW}

# Errors meaning "the interface went away or down": the capture restarts when it is back.
INTERFACE_GONE = frozenset((errno.ENETDOWN, errno.ENODEV, errno.ENXIO))


class FanoutError(SourceError):
    """The socket cannot join the ``--fanout-group`` asked for."""


def read_block(ring, block_start: int, link_type: int, skip_outgoing_on: int, timestamps: bool = False
               ) -> FrameBatch:
    """The frames of one TPACKET_V3 ring block the kernel handed over (its status has TP_STATUS_USER).

    ``ring`` is the mapped ring (or a bytes-like object like it), ``block_start`` the block's offset
    in it. Frames are read in place, no copy: the batch's buffer is ``ring`` itself, valid until the
    block goes back to the kernel. Lengths are those libpcap records: a VLAN tag the kernel took out
    counts its 4 bytes, and a cooked frame (``LINKTYPE_LINUX_SLL`` captures) the 16 of the SLL header
    libpcap puts in front. The tag itself is not put back, nor is an SLL header built: the frame
    decodes the same without them. Instead, a cooked frame's protocol is written into the headroom
    the kernel leaves before it, where an Ethernet header has its type, and the frame is handed on
    as Ethernet (so a cooked capture's batch is ``LINKTYPE_ETHERNET``). Outgoing frames of interface
    index ``skip_outgoing_on`` (the loopback; 0: none) are left out: loopback frames show up twice,
    outgoing and incoming, and libpcap keeps one. With ``timestamps``, the batch carries each frame's
    ``tp_sec`` and ``tp_nsec``.
    """
    packet_count, first = BLOCK_PACKETS.unpack_from(ring, block_start + BLOCK_STATUS_OFFSET)
    headers = chained_records(ring, block_start + first, packet_count)
    size = len(ring)
    u16 = np.ndarray((size - 1,), np.uint16, ring, 0, (1,))
    u32 = np.ndarray((size - 3,), np.uint32, ring, 0, (1,))
    starts = headers + u16[headers + HEADER_MAC]
    ends = starts + u32[headers + HEADER_SNAPLEN]
    wire_lengths = u32[headers + HEADER_LENGTH].astype(np.int64)
    if link_type in (LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL):  # libpcap puts tags back in these; a nonzero TCI is one
        tagged = (u32[headers + HEADER_VLAN_TCI] != 0) | (u32[headers + HEADER_STATUS] & TP_STATUS_VLAN_VALID != 0)
        wire_lengths += VLAN_TAG_LENGTH * tagged
    if skip_outgoing_on:
        outgoing = ((np.frombuffer(ring, np.uint8)[headers + SOCKADDR_LL_OFFSET + SOCKADDR_PKTTYPE] == PACKET_OUTGOING)
                    & (u32[headers + SOCKADDR_LL_OFFSET + SOCKADDR_IFINDEX] == skip_outgoing_on))
        headers, starts, ends, wire_lengths = (values[~outgoing] for values in (headers, starts, ends, wire_lengths))
    stamps = u32[headers + HEADER_SEC] + u32[headers + HEADER_NSEC] / 1e9 if timestamps else None
    if link_type == LINKTYPE_LINUX_SLL:
        if len(starts) and (starts - headers).min() < SOCKADDR_LL_END + ETHERNET_HEADER_LENGTH:
            raise SourceError(f"unexpected capture ring layout (frame data at {(starts - headers).min()} bytes "
                              f"from its header)")
        u16[starts - 2] = u16[headers + SOCKADDR_LL_OFFSET + SOCKADDR_PROTOCOL]  # network order, copied as is
        starts = starts - ETHERNET_HEADER_LENGTH
        wire_lengths += SLL_HEADER_LENGTH
        link_type = LINKTYPE_ETHERNET
    return FrameBatch(link_type, ring, starts, ends, wire_lengths, stamps)


def ring_request(ring_bytes: int, block_bytes: int = RING_BLOCK_BYTES) -> tuple[int, ...]:
    """The ``tpacket_req3`` fields for a ring of about ``ring_bytes`` (at least one page-sized block).

    Blocks of ``block_bytes``, smaller in a small ring so that it still has ``MINIMUM_RING_BLOCKS``:
    the kernel fills one while the exporter counts another. TPACKET_V3 packs frames of any size
    into a block, so the frame size only has to pass the kernel's checks: one "frame" per block.
    """
    page = mmap.PAGESIZE
    block_size = max(page, min(block_bytes, ring_bytes // MINIMUM_RING_BLOCKS // page * page))
    block_count = max(1, ring_bytes // block_size)
    return (block_size, block_count, block_size, block_count, RING_RETIRE_MS, 0, 0)


def join_fanout_group(sock: socket.socket, group: int) -> None:
    """Join a ``PACKET_FANOUT`` group: the kernel splits the interface's frames among its sockets by flow.

    Several exporters (processes) on one busy interface each count a share; Prometheus adds them up.
    """
    try:
        sock.setsockopt(SOL_PACKET, PACKET_FANOUT,
                        struct.pack("=I", group | (PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG) << 16))
    except OSError as error:
        raise FanoutError(f"cannot join fanout group {group}: {error.strerror} (its members must capture the same "
                          f"interface, and the group's mode is by flow hash)") from None


class LiveSource:
    """Frames of one interface (or ``any``), read from an AF_PACKET socket's TPACKET_V3 ring.

    The socket is opened by the constructor, so start-up fails early on a missing interface, a bad
    filter or missing privileges. After an error ``open()`` reopens it; Capture calls it on restart.
    """

    kind = "live"
    restartable = True  # after an error the socket is opened again: nothing is counted twice

    def __init__(self, interface: str, bpf_filter: str = "", *, ring_bytes: int,
                 fanout_group: Optional[int] = None, timestamps: bool = False):
        self.name = interface
        self.timestamps = timestamps  # batches carry each frame's time (for TCP health)
        self.filter = bpf_filter
        self.ring_bytes = ring_bytes
        self.fanout_group = fanout_group
        self._socket: Optional[socket.socket] = None
        self._ring: Optional[mmap.mmap] = None
        self._block_size = self._block_count = 0
        self._ring_shrink_logged = False
        self._dropped = 0
        self._program_for: dict[int, list] = {}
        # An interface that exists but is down is not a start-up error: the capture reports it and
        # starts counting once the interface is up.
        self._open(require_up=False)

    def open(self) -> "LiveSource":
        """Open the socket if it is closed; SourceError (or a subclass) while that is impossible."""
        return self._open(require_up=True)

    def _open(self, require_up: bool) -> "LiveSource":
        if self._socket is not None:
            return self
        if self.name == ANY_INTERFACE:
            self.link_type, self._loopback_index = LINKTYPE_LINUX_SLL, loopback_index()
            kind, index = socket.SOCK_DGRAM, 0
        else:
            interface = list_interfaces().get(self.name)
            if interface is None:
                raise InterfaceNotFound(not_found_message(self.name, list_interfaces()))
            if require_up and not interface.up:
                raise SourceError(f"{self.name}: interface is down; capture resumes when it is up")
            self.link_type = RAW_LINK_TYPES.get(interface.hardware_type, LINKTYPE_LINUX_SLL)
            self._loopback_index = interface.index if interface.hardware_type == ARPHRD_LOOPBACK else 0
            kind = socket.SOCK_DGRAM if self.link_type == LINKTYPE_LINUX_SLL else socket.SOCK_RAW
            index = interface.index
        self._socket, self._ring = self._new_socket(kind, index)
        self._block = 0
        log.debug("capture ring open on %s (link type %d, %d blocks of %d KiB)", self.name, self.link_type,
                  self._block_count, self._block_size >> 10)
        return self

    def _new_socket(self, kind: int, index: int) -> tuple[socket.socket, mmap.mmap]:
        program = ACCEPT_HEADERS
        if self.filter:
            program = self._program_for.get(self.link_type)
            if program is None:
                # Compiled once per link type and kept: a restart needs no libpcap (nor privileges).
                program = adapt_bpf_for_kernel(compile_bpf(self.filter, self.link_type),
                                               cooked=self.link_type == LINKTYPE_LINUX_SLL)
                self._program_for[self.link_type] = program
        try:
            # Protocol 0 receives nothing until bind(): no frame reaches the ring before the filter
            # is attached, or from another interface.
            sock = socket.socket(socket.AF_PACKET, kind, 0)
        except PermissionError:
            raise CapturePermissionError(permission_message(self.name)) from None
        except OSError as error:
            raise SourceError(f"cannot open a packet socket: {error.strerror}") from None
        ring = None
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            request = self._request_ring(sock)
            self._block_size, self._block_count = request[0], request[1]
            ring = mmap.mmap(sock.fileno(), self._block_size * self._block_count, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
            attach_bpf(sock, program)
            bind_packet_socket(sock, index, ETH_P_ALL)
            if self.fanout_group is not None:
                join_fanout_group(sock, self.fanout_group)
        except (OSError, FanoutError) as error:
            if ring is not None:
                ring.close()
            sock.close()
            if isinstance(error, FanoutError):
                raise
            if error.errno in INTERFACE_GONE:
                raise InterfaceNotFound(f"{self.name}: interface not available ({error.strerror})") from None
            raise SourceError(f"{self.name}: cannot set up the capture socket: {error.strerror}") from None
        return sock, ring

    def _request_ring(self, sock: socket.socket) -> tuple[int, ...]:
        """Set up the socket's ring; while the kernel lacks the memory, ask for half as much (once said)."""
        ring_bytes = self.ring_bytes
        while True:
            request = ring_request(ring_bytes)
            try:
                sock.setsockopt(SOL_PACKET, PACKET_RX_RING, TPACKET_REQ3.pack(*request))
            except OSError as error:
                if error.errno != errno.ENOMEM or ring_bytes <= MINIMUM_RING_BYTES:
                    raise
                ring_bytes //= 2
                continue
            if ring_bytes < self.ring_bytes and not self._ring_shrink_logged:
                self._ring_shrink_logged = True
                log.warning("not enough kernel memory for a %d MiB capture ring: using %d MiB (more drops in "
                            "bursts)", self.ring_bytes >> 20, ring_bytes >> 20)
            return request

    def close(self) -> None:
        """Close the socket and unmap its ring, keeping the drop count."""
        if self._socket is not None:
            self._read_drops()
            self._ring.close()
            self._socket.close()
            self._socket = self._ring = None

    def kernel_dropped(self) -> int:
        """Frames the kernel dropped for lack of ring space, cumulative over reopenings."""
        self._read_drops()
        return self._dropped

    def _read_drops(self) -> None:
        if self._socket is None:
            return
        try:
            stats = self._socket.getsockopt(SOL_PACKET, PACKET_STATISTICS, TPACKET_STATS_V3.size)
        except OSError:
            return
        self._dropped += TPACKET_STATS_V3.unpack(stats)[1]  # reading resets the kernel's counters

    def batches(self, stop: threading.Event) -> Iterator[FrameBatch]:
        """Yield the frames of each block the kernel hands over; ``[]`` after each idle half second."""
        self.open()
        try:
            poller = select.poll()
            poller.register(self._socket, select.POLLIN)
            idle_ms = int(IDLE_SECONDS * 1000)
            ring, block_size, block_count = self._ring, self._block_size, self._block_count
            status_of = BLOCK_STATUS.unpack_from
            while not stop.is_set():
                start = self._block * block_size
                if not status_of(ring, start + BLOCK_STATUS_OFFSET)[0] & TP_STATUS_USER:
                    events = poller.poll(idle_ms)
                    if not events:
                        yield FrameBatch.empty(self.link_type)
                    elif events[0][1] & select.POLLERR:  # ENETDOWN when the interface goes down or away
                        code = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if code:
                            raise OSError(code, os.strerror(code))
                    continue
                batch = read_block(ring, start, self.link_type, self._loopback_index, self.timestamps)
                if batch:
                    yield batch  # counted in place: the block goes back to the kernel only afterwards
                    batch.starts = batch.ends = batch.wire_lengths = batch.starts[:0]  # no reading it once refilled
                    batch.timestamps = None
                BLOCK_STATUS.pack_into(ring, start + BLOCK_STATUS_OFFSET, TP_STATUS_KERNEL)
                self._block = (self._block + 1) % block_count
        except OSError as error:
            if error.errno in INTERFACE_GONE:
                raise SourceError(f"{self.name}: interface went down or was removed ({error.strerror})") from None
            raise SourceError(f"{self.name}: capture socket failed: {error.strerror or error}") from None
        finally:
            self.close()


class _SockaddrLL(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("protocol", ctypes.c_ushort), ("ifindex", ctypes.c_int),
                ("hatype", ctypes.c_ushort), ("pkttype", ctypes.c_ubyte), ("halen", ctypes.c_ubyte),
                ("address", ctypes.c_ubyte * 8)]


def bind_packet_socket(sock: socket.socket, index: int, protocol: int) -> None:
    """bind(2) a packet socket to an interface index, 0 meaning every interface.

    Python's own bind() takes an interface name and cannot express "every interface".
    """
    libc = ctypes.CDLL(None, use_errno=True)
    address = _SockaddrLL(socket.AF_PACKET, socket.htons(protocol), index)
    if libc.bind(sock.fileno(), ctypes.byref(address), ctypes.sizeof(address)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
