"""Live capture from a network interface through an AF_PACKET socket's TPACKET_V3 ring (packet(7),
the kernel's Documentation/networking/packet_mmap.rst).

Scapy finds the interface and its addresses and compiles the BPF filter (through libpcap). Frames
are read from a ring shared with the kernel, as libpcap reads them: the kernel fills blocks of
frames and hands a block over when it is full or after ``RING_RETIRE_MS``; one ``poll`` per block,
no system call and no copy per frame: a block is counted in place, then handed back. Only the
first ``CAPTURE_SNAPLEN`` bytes of a frame, its headers, reach the ring (the filter's return
value), so the ring holds many frames. What the kernel hands a packet socket differs from what
was on the wire in two ways, both accounted for as libpcap does:

- VLAN tags stripped by the NIC or by veth arrive out of band, in the frame's ``tpacket3_hdr``;
  their 4 bytes are counted in the frame's length.
- GRO/TSO aggregates can be far larger than the MTU; the frame's full length comes from ``tp_len``
  whatever was copied.
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import mmap
import os
import pwd
import re
import select
import socket
import struct
import sys
import threading
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np

from .decode import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_RAW
from .sources import FrameBatch, SourceError
from .walk import chained_records

log = logging.getLogger(__name__)

ANY_INTERFACE = "any"
IDLE_SECONDS = 0.5
RING_BYTES = 16 << 20  # kernel memory mapped into the process; ~50k frames of headers
RING_BLOCK_BYTES = 4 << 20  # one block -> one batch: up to ~12k frames of CAPTURE_SNAPLEN
MINIMUM_RING_BYTES = 4 << 20  # the smallest ring asked for when the kernel is short of memory
MINIMUM_RING_BLOCKS = 8
RING_RETIRE_MS = 250  # a block is handed over after this long even if not full (tcpdump: 1000)
# Bytes of each frame copied into the ring: every header the decoder reads (Ethernet, VLAN tags,
# IPv4 options or IPv6 extension headers, ports) fits; lengths come from the frame's tp_len.
CAPTURE_SNAPLEN = 256

# <linux/if_ether.h>, <linux/if_packet.h>, <asm-generic/socket.h>
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
SO_ATTACH_FILTER = 26
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
HEADER_SNAPLEN, HEADER_LENGTH, HEADER_STATUS, HEADER_MAC, HEADER_VLAN_TCI = 12, 16, 20, 24, 32
# struct sockaddr_ll, at TPACKET_ALIGN(sizeof(struct tpacket3_hdr)) after each frame's header:
# family, protocol (network order), ifindex, hatype, pkttype
SOCKADDR_LL_OFFSET = 48
SOCKADDR_PROTOCOL, SOCKADDR_IFINDEX, SOCKADDR_PKTTYPE = 2, 4, 10
SOCKADDR_LL_END = SOCKADDR_LL_OFFSET + 20
BPF_INSTRUCTION = struct.Struct("=HBBI")  # code, jt, jf, k
SLL_HEADER_LENGTH = 16  # libpcap's LINKTYPE_LINUX_SLL header, in front of each cooked frame it records
ETHERNET_HEADER_LENGTH = 14
VLAN_TAG_LENGTH = 4

# <linux/if_arp.h> hardware types -> what a SOCK_RAW socket delivers; other types are read cooked.
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
ARPHRD_RAWIP = 519
ARPHRD_NONE = 0xFFFE
RAW_LINK_TYPES = {ARPHRD_ETHER: LINKTYPE_ETHERNET, ARPHRD_LOOPBACK: LINKTYPE_ETHERNET,
                  ARPHRD_RAWIP: LINKTYPE_RAW, ARPHRD_NONE: LINKTYPE_RAW}
IFF_UP = 0x1

# Errors meaning "the interface went away or down": the capture restarts when it is back.
INTERFACE_GONE = frozenset((errno.ENETDOWN, errno.ENODEV, errno.ENXIO))

# /proc/net/route flags <linux/route.h>
RTF_UP = 0x0001
RTF_REJECT = 0x0200

# <linux/capability.h>, <linux/prctl.h>
CAP_NET_RAW = 13
PR_SET_KEEPCAPS = 8
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class InterfaceNotFound(SourceError):
    """The capture interface does not exist (at start-up: a configuration error)."""


class FilterError(SourceError):
    """The BPF filter does not compile; the message is the compiler's."""


class FanoutError(SourceError):
    """The socket cannot join the ``--fanout-group`` asked for."""


class CapturePermissionError(SourceError):
    """The process may not open a packet socket (no CAP_NET_RAW)."""


class Interface(NamedTuple):
    """What the capture needs to know about an interface, read through Scapy's netlink provider."""

    name: str
    index: int
    hardware_type: int  # ARPHRD_*
    up: bool
    addresses: tuple[str, ...]  # IPv4 and IPv6, as the kernel lists them


def list_interfaces() -> dict[str, Interface]:
    """Every interface of this network namespace, read fresh (an interface may come and go)."""
    from scapy.arch.linux import LinuxInterfaceProvider

    found = {}
    for name, iface in LinuxInterfaceProvider().load().items():
        addresses = tuple(address for version in (4, 6) for address in iface.ips.get(version, ()))
        found[name] = Interface(name, iface.index, iface.type, bool(int(iface.flags) & IFF_UP), addresses)
    return found


def server_addresses(interface: str) -> tuple[str, ...]:
    """The default server set: the interface's IPv4 and global IPv6 addresses (all interfaces for ``any``).

    Link-local IPv6 addresses are left out (they carry neighbour discovery, not clients), and so are
    loopback addresses when capturing on ``any``.
    """
    interfaces = list_interfaces()
    if interface == ANY_INTERFACE:
        candidates = [address for iface in interfaces.values() for address in iface.addresses]
    elif interface in interfaces:
        candidates = list(interfaces[interface].addresses)
    else:
        raise InterfaceNotFound(_not_found_message(interface, interfaces))
    chosen = []
    for text in candidates:
        address = ipaddress.ip_address(text.split("%")[0])
        if address.version == 6 and address.is_link_local:
            continue
        if interface == ANY_INTERFACE and address.is_loopback:
            continue
        if str(address) not in chosen:
            chosen.append(str(address))
    return tuple(chosen)


def default_route_interface(route_text: str, ipv6_route_text: str = "") -> Optional[str]:
    """The interface of the IPv4 default route with the lowest metric, else of the IPv6 one.

    Parses the text of ``/proc/net/route`` and ``/proc/net/ipv6_route``.
    """
    best: Optional[tuple[int, str]] = None
    for line in route_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        name, destination, flags, metric, mask = fields[0], fields[1], fields[3], fields[6], fields[7]
        try:
            if int(destination, 16) or int(mask, 16) or not int(flags, 16) & RTF_UP:
                continue
            candidate = (int(metric), name)
        except ValueError:
            continue
        if best is None or candidate < best:
            best = candidate
    if best is not None:
        return best[1]
    for line in ipv6_route_text.splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        destination, prefix_length, metric, flags, name = fields[0], fields[1], fields[5], fields[8], fields[9]
        try:
            if int(destination, 16) or int(prefix_length, 16) or name == "lo":
                continue
            if not int(flags, 16) & RTF_UP or int(flags, 16) & RTF_REJECT:
                continue
            candidate = (int(metric, 16), name)
        except ValueError:
            continue
        if best is None or candidate < best:
            best = candidate
    return best[1] if best else None


def default_interface() -> str:
    """The interface holding the default route, read from /proc; SourceError when there is none."""
    texts = []
    for path in ("/proc/net/route", "/proc/net/ipv6_route"):
        try:
            with open(path) as file:
                texts.append(file.read())
        except OSError:
            texts.append("")
    name = default_route_interface(*texts)
    if name is None:
        raise InterfaceNotFound("no default route to pick a capture interface from; pass --interface NAME")
    return name


def read_block(ring, block_start: int, link_type: int, skip_outgoing_on: int) -> FrameBatch:
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
    outgoing and incoming, and libpcap keeps one.
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
    if link_type == LINKTYPE_LINUX_SLL:
        if len(starts) and (starts - headers).min() < SOCKADDR_LL_END + ETHERNET_HEADER_LENGTH:
            raise SourceError(f"unexpected capture ring layout (frame data at {(starts - headers).min()} bytes "
                              f"from its header)")
        u16[starts - 2] = u16[headers + SOCKADDR_LL_OFFSET + SOCKADDR_PROTOCOL]  # network order, copied as is
        starts = starts - ETHERNET_HEADER_LENGTH
        wire_lengths += SLL_HEADER_LENGTH
        link_type = LINKTYPE_ETHERNET
    return FrameBatch(link_type, ring, starts, ends, wire_lengths)


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


def compile_bpf(expression: str, link_type: int) -> list[tuple[int, int, int, int]]:
    """Compile a filter with libpcap (through Scapy) for frames of ``link_type``; FilterError if invalid."""
    from scapy.arch.common import compile_filter
    from scapy.arch.common import free_filter
    from scapy.error import Scapy_Exception

    try:
        program = compile_filter(expression, linktype=link_type)
    except (Scapy_Exception, OSError, ImportError) as error:
        text = str(error)
        match = re.search(r"\((.*)\)$", text)
        raise FilterError(f"invalid BPF filter {expression!r}: {match.group(1) if match else text}") from None
    try:
        return [(program.bf_insns[i].code, program.bf_insns[i].jt, program.bf_insns[i].jf,
                 program.bf_insns[i].k & 0xFFFFFFFF) for i in range(program.bf_len)]
    finally:
        free_filter(program)


# BPF opcode fields <linux/filter.h>
BPF_LD, BPF_LDX, BPF_RET = 0x00, 0x01, 0x06
BPF_ABS, BPF_IND, BPF_MSH = 0x20, 0x40, 0xA0
BPF_K = 0x00
SKF_AD_OFF = -0x1000 & 0xFFFFFFFF
SKF_AD_PROTOCOL, SKF_AD_PKTTYPE = 0, 4


def adapt_bpf_for_kernel(program: list[tuple[int, int, int, int]], cooked: bool) -> list[tuple[int, int, int, int]]:
    """Adjust a libpcap program for the kernel socket filter, as libpcap's ``fix_program`` does.

    Accepting returns keep ``CAPTURE_SNAPLEN`` bytes, the headers, of each frame. In cooked mode the
    kernel filters the network-layer payload, without the 16-byte SLL header the program was
    compiled for: payload offsets move down 16, and the SLL packet type and protocol fields become
    the kernel's ancillary loads. A program reading other SLL fields cannot run in the kernel.
    """
    adapted = []
    for code, jt, jf, k in program:
        kind = code & 0x07
        if kind == BPF_RET and code & 0x18 == BPF_K and k:
            k = CAPTURE_SNAPLEN
        elif cooked and kind in (BPF_LD, BPF_LDX) and code & 0xE0 in (BPF_ABS, BPF_IND, BPF_MSH) \
                and k < SKF_AD_OFF:
            if k >= SLL_HEADER_LENGTH:
                k -= SLL_HEADER_LENGTH
            elif k == 0:
                k = SKF_AD_OFF + SKF_AD_PKTTYPE
            elif k == 14:
                k = SKF_AD_OFF + SKF_AD_PROTOCOL
            else:
                raise FilterError("this filter reads link-layer fields that a cooked capture (interface any "
                                  "or a non-Ethernet interface) cannot filter in the kernel")
        adapted.append((code, jt, jf, k))
    return adapted


def attach_bpf(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """Attach a compiled program to a socket (SO_ATTACH_FILTER takes a struct sock_fprog)."""
    instructions = ctypes.create_string_buffer(b"".join(BPF_INSTRUCTION.pack(*insn) for insn in program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    struct.pack("HL", len(program), ctypes.addressof(instructions)))


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


def _not_found_message(name: str, interfaces: dict) -> str:
    return f"no interface named {name!r} (available: {', '.join(sorted(interfaces)) or 'none'}, any)"


def permission_message(interface: str) -> str:
    """One line telling how to grant what a packet socket needs."""
    python = os.path.realpath(sys.executable)
    return (f"cannot capture on {interface}: permission denied, a packet socket needs CAP_NET_RAW; "
            f"run as root (sudo), or grant it once with 'sudo setcap cap_net_raw,cap_net_admin+eip {python}', "
            f"or in a container add 'cap_add: [NET_RAW, NET_ADMIN]' (docker compose)")


class LiveSource:
    """Frames of one interface (or ``any``), read from an AF_PACKET socket's TPACKET_V3 ring.

    The socket is opened by the constructor, so start-up fails early on a missing interface, a bad
    filter or missing privileges. After an error ``open()`` reopens it; Capture calls it on restart.
    """

    kind = "live"

    def __init__(self, interface: str, bpf_filter: str = "", *, ring_bytes: int = RING_BYTES,
                 fanout_group: Optional[int] = None):
        self.name = interface
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
            self.link_type, self._loopback_index = LINKTYPE_LINUX_SLL, _loopback_index()
            kind, index = socket.SOCK_DGRAM, 0
        else:
            interface = list_interfaces().get(self.name)
            if interface is None:
                raise InterfaceNotFound(_not_found_message(self.name, list_interfaces()))
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
        program = [(BPF_RET | BPF_K, 0, 0, CAPTURE_SNAPLEN)]  # accept every frame, headers only
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
                batch = read_block(ring, start, self.link_type, self._loopback_index)
                if batch:
                    yield batch  # counted in place: the block goes back to the kernel only afterwards
                    batch.starts = batch.ends = batch.wire_lengths = batch.starts[:0]  # no reading it once refilled
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


def _loopback_index() -> int:
    for interface in list_interfaces().values():
        if interface.hardware_type == ARPHRD_LOOPBACK:
            return interface.index
    return 0


class _CapabilityHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapabilityData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def resolve_user(name: str) -> tuple[int, int]:
    """(uid, gid) of a user name or numeric id; KeyError when unknown."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if not name.isdigit():
            raise
        entry = pwd.getpwuid(int(name))
    return entry.pw_uid, entry.pw_gid


def drop_privileges(user: str, keep: Sequence[int] = (CAP_NET_RAW,)) -> bool:
    """Become ``user`` (no supplementary groups), keeping only the capabilities in ``keep``.

    Like ``tcpdump -Z``, but CAP_NET_RAW survives the switch (PR_SET_KEEPCAPS, then capset) so the
    capture can reopen its socket when an interface comes back. Capabilities are per thread: the
    calling thread, and the threads it starts afterwards (the capture thread), keep ``keep``;
    threads already running (waitress's workers) switch user too, since glibc applies setuid to
    every thread, and lose every capability. Returns whether the capabilities were kept.
    """
    uid, gid = resolve_user(user)
    libc = ctypes.CDLL(None, use_errno=True)
    kept = libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) == 0
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if kept:
        header = _CapabilityHeader(LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapabilityData * 2)()
        for capability in keep:
            data[capability // 32].effective |= 1 << capability % 32
            data[capability // 32].permitted |= 1 << capability % 32
        kept = libc.capset(ctypes.byref(header), data) == 0
        libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)
    if not kept:
        log.warning("could not keep CAP_NET_RAW after switching to %s: the capture cannot reopen its socket "
                    "after an interface loss", user)
    return kept
