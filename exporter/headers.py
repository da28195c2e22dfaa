"""Header fields of a whole batch of frames, read at once with numpy: link layer, IP header, ports.

Frames of the common shapes -- Ethernet (or Linux cooked SLL/SLL2) with up to two VLAN tags of any
TPID, raw IP, IPv4 with or without options, fragments, IPv6 with hop-by-hop, routing,
destination-options, fragment and AH headers, TCP/UDP ports -- are read here exactly as
``decode_frame`` reads them; every other frame is marked SLOW for the reference to decode.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .decode import (ETHERNET_HEADER_LENGTH, ETHERTYPE_IPV4, ETHERTYPE_IPV6, IPPROTO_AH, IPPROTO_FRAGMENT,
                     IPPROTO_TCP, IPPROTO_UDP, IPV6_EXTENSION_HEADERS, LINKTYPE_ETHERNET, LINKTYPE_IPV4,
                     LINKTYPE_IPV6, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_RAW, LINKTYPE_RAW_12,
                     LINKTYPE_RAW_14, SLL2_HEADER_LENGTH, SLL_HEADER_LENGTH, VLAN_TPIDS)

# What happened to each frame, as a small code per frame.
COUNTED, IGNORED_NOT_IP, IGNORED_NOT_SERVER, IGNORED_INTERNAL, IGNORED_MALFORMED, SLOW = range(6)
# Link types read by the array code: (offset of the ethertype, offset of the first tag or the IP
# header) for ethertype framings; the IP version nibble decides for raw IP.
ETHERTYPE_FRAMINGS = {LINKTYPE_ETHERNET: (12, ETHERNET_HEADER_LENGTH), LINKTYPE_LINUX_SLL: (14, SLL_HEADER_LENGTH),
                      LINKTYPE_LINUX_SLL2: (0, SLL2_HEADER_LENGTH)}
RAW_IP = frozenset((LINKTYPE_RAW, LINKTYPE_RAW_12, LINKTYPE_RAW_14, LINKTYPE_IPV4, LINKTYPE_IPV6))
# IPv6 extension headers followed in array code; a longer chain takes the slow path.
MAX_EXTENSION_HEADERS = 4
_IS_TPID = np.zeros(65536, bool)
_IS_TPID[list(VLAN_TPIDS)] = True
_IS_CHAINED = np.zeros(256, bool)  # IPv6 next headers the walk follows
_IS_CHAINED[[*IPV6_EXTENSION_HEADERS, IPPROTO_FRAGMENT, IPPROTO_AH]] = True


class HeaderReader:
    """Big-endian fields at arbitrary byte offsets of one buffer, gathered for many frames at once."""

    def __init__(self, buffer):
        if len(buffer) < 8:
            buffer = bytes(buffer) + bytes(8)
        size = len(buffer)
        self.u8 = np.frombuffer(buffer, np.uint8)
        # Overlapping views, one byte apart: element i is the field starting at byte i.
        self.be16 = np.ndarray((size - 1,), ">u2", buffer, 0, (1,))
        self.be32 = np.ndarray((size - 3,), ">u4", buffer, 0, (1,))
        self.be64 = np.ndarray((size - 7,), ">u8", buffer, 0, (1,))
        self.size = size

    # Offsets are clipped to the buffer: a field that lies inside its frame is never clipped, and
    # a field read past a frame's end is never used.
    def u8_at(self, offsets: np.ndarray) -> np.ndarray:
        return self.u8[np.minimum(offsets, self.size - 1)]

    def u16_at(self, offsets: np.ndarray) -> np.ndarray:
        return self.be16[np.minimum(offsets, self.size - 2)]

    def u32_at(self, offsets: np.ndarray) -> np.ndarray:
        return self.be32[np.minimum(offsets, self.size - 4)]

    def u64_at(self, offsets: np.ndarray) -> np.ndarray:
        return self.be64[np.minimum(offsets, self.size - 8)].astype(np.uint64)


class IPFrames(NamedTuple):
    """Fields of the frames of one IP version that have a sound IP header, by frame index."""

    index: np.ndarray
    src_hi: np.ndarray  # IPv4: 0
    src_lo: np.ndarray
    dst_hi: np.ndarray
    dst_lo: np.ndarray
    protocol: np.ndarray  # after IPv6 extension headers
    sport: np.ndarray  # -1 when the frame carries no port the reference would read
    dport: np.ndarray
    network: np.ndarray  # offset of the IP header in the buffer
    transport: np.ndarray  # offset of the transport header (after IPv6 extension headers)


def parse_frames(link_type: int, buffer, starts: np.ndarray, ends: np.ndarray
                 ) -> Optional[tuple[np.ndarray, tuple[IPFrames, IPFrames]]]:
    """Per frame a result code, and the IPv4 and IPv6 frames' fields; None: no array code for the link type.

    The code is COUNTED for a sound IP header (to classify), IGNORED_NOT_IP, or SLOW for a frame
    the reference decodes one by one.
    """
    reader = HeaderReader(buffer)
    frames = len(starts)
    if link_type in ETHERTYPE_FRAMINGS:
        ethertype_at, base = ETHERTYPE_FRAMINGS[link_type]
        ethertype = reader.u16_at(starts + ethertype_at)
        network = starts + base
        tagged = np.flatnonzero(_IS_TPID[ethertype])
        if len(tagged):
            inner = reader.u16_at(starts[tagged] + base + 2)
            two_tags = _IS_TPID[inner]
            innermost = reader.u16_at(starts[tagged] + base + 6)
            ethertype[tagged] = np.where(two_tags, innermost, inner)
            network[tagged] += 4 + 4 * two_tags
            three_tags = tagged[two_tags & _IS_TPID[innermost]]
        readable = ends >= network
        result = np.where(readable, IGNORED_NOT_IP, SLOW).astype(np.uint8)
        if len(tagged):
            result[three_tags] = SLOW
            readable[three_tags] = False
        is_v4 = np.flatnonzero(readable & (ethertype == ETHERTYPE_IPV4))
        is_v6 = np.flatnonzero(readable & (ethertype == ETHERTYPE_IPV6))
    elif link_type in RAW_IP:
        network = starts
        version = np.where(ends > starts, reader.u8_at(starts) >> 4, 0)
        result = np.full(frames, SLOW, np.uint8)  # neither version: malformed, as the reference says
        is_v4 = np.flatnonzero(version == 4) if link_type != LINKTYPE_IPV6 else np.zeros(0, np.intp)
        is_v6 = np.flatnonzero(version == 6) if link_type != LINKTYPE_IPV4 else np.zeros(0, np.intp)
    else:
        return None
    v4 = _parse_ipv4(reader, is_v4, network[is_v4], ends[is_v4], result)
    v6 = _parse_ipv6(reader, is_v6, network[is_v6], ends[is_v6], result)
    return result, (v4, v6)


def _parse_ipv4(reader: HeaderReader, index: np.ndarray, network: np.ndarray, ends: np.ndarray,
                result: np.ndarray) -> IPFrames:
    version_ihl = reader.u8_at(network)
    header_length = (version_ihl & 0x0F).astype(np.int64) * 4
    sound = (version_ihl >> 4 == 4) & (header_length >= 20) & (ends >= network + header_length)
    result[index[~sound]] = SLOW  # malformed, as the reference says
    index, network, ends, header_length = index[sound], network[sound], ends[sound], header_length[sound]
    protocol = reader.u8_at(network + 9).astype(np.int64)
    has_ports = (reader.u16_at(network + 6) & 0x1FFF) == 0  # not a later fragment
    result[index] = COUNTED
    sport, dport = _ports(reader, network + header_length, ends, protocol, has_ports)
    zeros = np.zeros(len(index), np.uint64)
    return IPFrames(index, zeros, reader.u32_at(network + 12).astype(np.uint64), zeros,
                    reader.u32_at(network + 16).astype(np.uint64), protocol, sport, dport, network,
                    network + header_length)


def _parse_ipv6(reader: HeaderReader, index: np.ndarray, network: np.ndarray, ends: np.ndarray,
                result: np.ndarray) -> IPFrames:
    sound = (reader.u8_at(network) >> 4 == 6) & (ends >= network + 40)
    result[index[~sound]] = SLOW  # malformed, as the reference says
    index, network, ends = index[sound], network[sound], ends[sound]
    protocol = reader.u8_at(network + 6).astype(np.int64)
    transport = network + 40
    has_ports = np.ones(len(index), bool)
    chained = np.flatnonzero(_IS_CHAINED[protocol])
    long_chains = _walk_extensions(reader, chained, ends, protocol, transport, has_ports)
    result[index] = COUNTED
    if len(long_chains):
        result[index[long_chains]] = SLOW
        keep = np.ones(len(index), bool)
        keep[long_chains] = False
        index, network, ends, protocol, transport, has_ports = (
            values[keep] for values in (index, network, ends, protocol, transport, has_ports))
    sport, dport = _ports(reader, transport, ends, protocol, has_ports)
    return IPFrames(index, reader.u64_at(network + 8), reader.u64_at(network + 16), reader.u64_at(network + 24),
                    reader.u64_at(network + 32), protocol, sport, dport, network, transport)


class TcpFields(NamedTuple):
    """TCP header fields of frames, for TCP health."""

    flags: np.ndarray  # uint8
    seq: np.ndarray  # uint32
    ack: np.ndarray  # uint32
    payload: np.ndarray  # int64: TCP payload bytes, from the IP length (never the captured length)
    sound: np.ndarray  # bool: a data offset of at least 20 bytes, not an IPv4 fragment


def tcp_fields(buffer, v6: bool, starts: np.ndarray, network: np.ndarray, transport: np.ndarray,
               wire_lengths: np.ndarray) -> TcpFields:
    """TCP header fields of frames whose IP header is at ``network`` and TCP header (20 bytes captured) at ``transport``.

    The payload length is the IP payload length less the TCP header, so Ethernet padding and a
    short snap length change nothing. An IP length of 0 (a segmentation-offload frame captured on
    the sending host) is taken from the wire length instead.
    """
    reader = HeaderReader(buffer)
    if v6:
        stated = reader.u16_at(network + 4).astype(np.int64)
        ip_end = np.where(stated > 0, network + 40 + stated, starts + wire_lengths)
        fragment = np.zeros(len(network), bool)  # a first IPv6 fragment counts the payload it holds
    else:
        stated = reader.u16_at(network + 2).astype(np.int64)
        ip_end = np.where(stated > 0, network + stated, starts + wire_lengths)
        fragment = (reader.u16_at(network + 6) & 0x2000) != 0  # more fragments: a part of the segment
    data_offset = (reader.u8_at(transport + 12) >> 4).astype(np.int64) * 4
    return TcpFields(reader.u8_at(transport + 13), reader.u32_at(transport + 4).astype(np.uint32),
                     reader.u32_at(transport + 8).astype(np.uint32),
                     np.maximum(ip_end - transport - data_offset, 0), (data_offset >= 20) & ~fragment)


def _ports(reader: HeaderReader, transport: np.ndarray, ends: np.ndarray, protocol: np.ndarray,
           has_ports: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source and destination ports where the reference reads them (a whole TCP or UDP header), else -1."""
    readable = has_ports & (((protocol == IPPROTO_TCP) & (ends >= transport + 20))
                            | ((protocol == IPPROTO_UDP) & (ends >= transport + 8)))
    ports = reader.u32_at(transport).astype(np.int64)
    return np.where(readable, ports >> 16, -1), np.where(readable, ports & 0xFFFF, -1)


def _walk_extensions(reader: HeaderReader, chained: np.ndarray, ends: np.ndarray, protocol: np.ndarray,
                     transport: np.ndarray, has_ports: np.ndarray) -> np.ndarray:
    """Follow IPv6 extension headers of the frames ``chained`` as ``decode._ipv6`` does; update in place.

    Returns the frames whose chain is longer than MAX_EXTENSION_HEADERS (for the slow path).
    """
    for _ in range(MAX_EXTENSION_HEADERS):
        if len(chained) == 0:
            return chained
        position, next_header, end = transport[chained], protocol[chained], ends[chained]
        room = end >= position + 8
        # a chain running past the captured bytes: the IP header is sound, the ports unknown
        has_ports[chained[~room]] = False
        chained, position, next_header = chained[room], position[room], next_header[room]
        header = reader.u16_at(position)
        following, length = (header >> 8).astype(np.int64), (header & 0xFF).astype(np.int64)
        fragment = next_header == IPPROTO_FRAGMENT
        later_fragment = fragment & ((reader.u16_at(position + 2) >> 3) != 0)
        protocol[chained] = following
        has_ports[chained[later_fragment]] = False
        transport[chained] = np.where(fragment, position + 8,
                                      np.where(next_header == IPPROTO_AH, position + (length + 2) * 4,
                                               position + (length + 1) * 8))
        chained = chained[~later_fragment & _IS_CHAINED[following]]
    return chained
