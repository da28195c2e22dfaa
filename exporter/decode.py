"""Decode a captured frame's raw bytes down to its outermost IP header and transport ports.

The reference decoder, one frame at a time, reading it in place in its capture buffer: the array
engine (``engine.py``) is tested against it and hands it the frames of rare shapes. Nothing here
raises: frames that cannot be read come back as ``MALFORMED`` and frames without an IP header as
``NOT_IP``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

NOT_IP = "not_ip"
MALFORMED = "malformed"

# pcap LINKTYPE_* values (https://www.tcpdump.org/linktypes.html)
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_12 = 12  # DLT_RAW on most BSDs
LINKTYPE_RAW_14 = 14  # DLT_RAW on OpenBSD
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

ETHERNET_HEADER_LENGTH = 14
VLAN_TAG_LENGTH = 4
SLL_HEADER_LENGTH = 16  # LINKTYPE_LINUX_SLL
SLL2_HEADER_LENGTH = 20  # LINKTYPE_LINUX_SLL2

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_8021Q = 0x8100
VLAN_TPIDS = frozenset((ETHERTYPE_8021Q, 0x88A8, 0x9100, 0x9200))
# BSD address families for IPv6 differ per OS (NetBSD/OpenBSD 24, FreeBSD 28, Darwin 30).
NULL_AF_INET = 2
NULL_AF_INET6 = frozenset((24, 28, 30))

IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_AH = 51
IPPROTO_FRAGMENT = 44
# Extension headers walked to reach the transport header (hop-by-hop, routing, dest. options).
IPV6_EXTENSION_HEADERS = frozenset((0, 43, 60))


# The outermost IP header of a frame as a plain tuple (cheaper to build than a named one):
# (src, dst, ip_proto, sport, dport) -- packed 4- or 16-byte addresses, the transport protocol after
# IPv6 extension headers, and the ports, -1 when the frame carries none we can read.
Decoded = Tuple[bytes, bytes, int, int, int]
DecodeResult = Union[Decoded, str]


def decode_frame(link_type: int, data: bytes, start: int = 0, end: Optional[int] = None) -> DecodeResult:
    """Return the outermost IP header and ports of the frame ``data[start:end]``, or ``NOT_IP`` / ``MALFORMED``.

    The frame is read in place: ``data`` may be a whole capture buffer holding many frames.
    """
    if end is None:
        end = len(data)
    try:
        decoder = _LINK_DECODERS.get(link_type)
        if decoder is None:
            return MALFORMED
        return decoder(data, start, end)
    except Exception:  # defensive: a decoder bug must cost one frame, never the capture
        return MALFORMED


def supported_link_types() -> frozenset[int]:
    """Link types ``decode_frame`` understands."""
    return frozenset(_LINK_DECODERS)


def _by_ethertype(ethertype: int, data: bytes, offset: int, end: int) -> DecodeResult:
    while ethertype in VLAN_TPIDS:
        if end < offset + VLAN_TAG_LENGTH:
            return MALFORMED
        ethertype = data[offset + 2] << 8 | data[offset + 3]
        offset += VLAN_TAG_LENGTH
    if ethertype == ETHERTYPE_IPV4:
        return _ipv4(data, offset, end)
    if ethertype == ETHERTYPE_IPV6:
        return _ipv6(data, offset, end)
    return NOT_IP


def _ethernet(data: bytes, start: int, end: int) -> DecodeResult:
    if end < start + ETHERNET_HEADER_LENGTH:
        return MALFORMED
    return _by_ethertype(data[start + 12] << 8 | data[start + 13], data, start + ETHERNET_HEADER_LENGTH, end)


def _linux_sll(data: bytes, start: int, end: int) -> DecodeResult:
    if end < start + SLL_HEADER_LENGTH:
        return MALFORMED
    return _by_ethertype(data[start + 14] << 8 | data[start + 15], data, start + SLL_HEADER_LENGTH, end)


def _linux_sll2(data: bytes, start: int, end: int) -> DecodeResult:
    if end < start + SLL2_HEADER_LENGTH:
        return MALFORMED
    return _by_ethertype(data[start] << 8 | data[start + 1], data, start + SLL2_HEADER_LENGTH, end)


def _null(data: bytes, start: int, end: int) -> DecodeResult:
    # The family is in the capturing host's byte order; families are small, so try both.
    if end < start + 4:
        return MALFORMED
    family = int.from_bytes(data[start:start + 4], "little")
    if family > 0xFFFF:
        family = int.from_bytes(data[start:start + 4], "big")
    return _by_family(family, data, start, end)


def _loop(data: bytes, start: int, end: int) -> DecodeResult:
    if end < start + 4:
        return MALFORMED
    return _by_family(int.from_bytes(data[start:start + 4], "big"), data, start, end)


def _by_family(family: int, data: bytes, start: int, end: int) -> DecodeResult:
    if family == NULL_AF_INET:
        return _ipv4(data, start + 4, end)
    if family in NULL_AF_INET6:
        return _ipv6(data, start + 4, end)
    return NOT_IP


def _raw(data: bytes, start: int, end: int) -> DecodeResult:
    if end <= start:
        return MALFORMED
    version = data[start] >> 4
    if version == 4:
        return _ipv4(data, start, end)
    if version == 6:
        return _ipv6(data, start, end)
    return MALFORMED


def _ipv4(data: bytes, offset: int, end: int) -> DecodeResult:
    if end < offset + 20:
        return MALFORMED
    version_ihl = data[offset]
    header_length = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != 4 or header_length < 20 or end < offset + header_length:
        return MALFORMED
    ip_proto = data[offset + 9]
    src = data[offset + 12:offset + 16]
    dst = data[offset + 16:offset + 20]
    if data[offset + 6] & 0x1F or data[offset + 7]:  # fragment offset: no transport header here
        return (src, dst, ip_proto, -1, -1)
    return _transport(data, offset + header_length, end, src, dst, ip_proto)


def _ipv6(data: bytes, offset: int, end: int) -> DecodeResult:
    if end < offset + 40 or data[offset] >> 4 != 6:
        return MALFORMED
    src = data[offset + 8:offset + 24]
    dst = data[offset + 24:offset + 40]
    next_header = data[offset + 6]
    position = offset + 40
    while True:
        if next_header in IPV6_EXTENSION_HEADERS:
            if end < position + 8:
                break
            next_header, position = data[position], position + (data[position + 1] + 1) * 8
        elif next_header == IPPROTO_FRAGMENT:
            if end < position + 8:
                break
            if (data[position + 2] << 8 | data[position + 3]) >> 3:
                return (src, dst, data[position], -1, -1)  # non-first fragment
            next_header, position = data[position], position + 8
        elif next_header == IPPROTO_AH:
            if end < position + 8:
                break
            next_header, position = data[position], position + (data[position + 1] + 2) * 4
        else:
            return _transport(data, position, end, src, dst, next_header)
    # The extension chain runs past the captured bytes: the IP header is sound, the ports unknown.
    return (src, dst, next_header, -1, -1)


def _transport(data: bytes, offset: int, end: int, src: bytes, dst: bytes, ip_proto: int) -> Decoded:
    if ip_proto == IPPROTO_TCP:
        readable = end >= offset + 20
    elif ip_proto == IPPROTO_UDP:
        readable = end >= offset + 8
    else:
        readable = False
    if not readable:  # Scapy, too, reads no ports from a header shorter than its minimum
        return (src, dst, ip_proto, -1, -1)
    return (src, dst, ip_proto, data[offset] << 8 | data[offset + 1], data[offset + 2] << 8 | data[offset + 3])


_LINK_DECODERS = {
    LINKTYPE_NULL: _null,
    LINKTYPE_ETHERNET: _ethernet,
    LINKTYPE_RAW_12: _raw,
    LINKTYPE_RAW_14: _raw,
    LINKTYPE_RAW: _raw,
    LINKTYPE_LOOP: _loop,
    LINKTYPE_LINUX_SLL: _linux_sll,
    LINKTYPE_IPV4: _ipv4,
    LINKTYPE_IPV6: _ipv6,
    LINKTYPE_LINUX_SLL2: _linux_sll2,
}
