"""Decode a captured frame's raw bytes down to its outermost IP header and transport ports.

Pure and allocation-light: this runs once per frame. It never raises; frames it cannot read
come back as ``MALFORMED`` and frames without an IP header as ``NOT_IP``.
"""
from __future__ import annotations

from typing import Tuple, Union

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

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
VLAN_TPIDS = frozenset((0x8100, 0x88A8, 0x9100, 0x9200))
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
# Equal frames give equal tuples, so a batch can be summed per flow before classification.
Decoded = Tuple[bytes, bytes, int, int, int]
DecodeResult = Union[Decoded, str]


def decode_frame(link_type: int, data: bytes) -> DecodeResult:
    """Return the frame's outermost IP header and ports, or ``NOT_IP`` / ``MALFORMED``."""
    try:
        decoder = _LINK_DECODERS.get(link_type)
        if decoder is None:
            return MALFORMED
        return decoder(data)
    except Exception:  # defensive: a decoder bug must cost one frame, never the capture
        return MALFORMED


def supported_link_types() -> frozenset[int]:
    """Link types ``decode_frame`` understands."""
    return frozenset(_LINK_DECODERS)


def _by_ethertype(ethertype: int, data: bytes, offset: int) -> DecodeResult:
    while ethertype in VLAN_TPIDS:
        if len(data) < offset + 4:
            return MALFORMED
        ethertype = data[offset + 2] << 8 | data[offset + 3]
        offset += 4
    if ethertype == ETHERTYPE_IPV4:
        return _ipv4(data, offset)
    if ethertype == ETHERTYPE_IPV6:
        return _ipv6(data, offset)
    return NOT_IP


def _ethernet(data: bytes) -> DecodeResult:
    # Untagged IPv4 and IPv6 go straight to the IP decoder: one call less for most frames.
    ethertype = data[12:14]
    if ethertype == b"\x08\x00":
        return _ipv4(data, 14)
    if ethertype == b"\x86\xdd":
        return _ipv6(data, 14)
    if len(data) < 14:
        return MALFORMED
    return _by_ethertype(data[12] << 8 | data[13], data, 14)


def _linux_sll(data: bytes) -> DecodeResult:
    if len(data) < 16:
        return MALFORMED
    return _by_ethertype(data[14] << 8 | data[15], data, 16)


def _linux_sll2(data: bytes) -> DecodeResult:
    if len(data) < 20:
        return MALFORMED
    return _by_ethertype(data[0] << 8 | data[1], data, 20)


def _null(data: bytes) -> DecodeResult:
    # The family is in the capturing host's byte order; families are small, so try both.
    if len(data) < 4:
        return MALFORMED
    family = int.from_bytes(data[:4], "little")
    if family > 0xFFFF:
        family = int.from_bytes(data[:4], "big")
    return _by_family(family, data)


def _loop(data: bytes) -> DecodeResult:
    if len(data) < 4:
        return MALFORMED
    return _by_family(int.from_bytes(data[:4], "big"), data)


def _by_family(family: int, data: bytes) -> DecodeResult:
    if family == NULL_AF_INET:
        return _ipv4(data, 4)
    if family in NULL_AF_INET6:
        return _ipv6(data, 4)
    return NOT_IP


def _raw(data: bytes) -> DecodeResult:
    if not data:
        return MALFORMED
    version = data[0] >> 4
    if version == 4:
        return _ipv4(data, 0)
    if version == 6:
        return _ipv6(data, 0)
    return MALFORMED


def _raw_ipv4(data: bytes) -> DecodeResult:
    return _ipv4(data, 0)


def _raw_ipv6(data: bytes) -> DecodeResult:
    return _ipv6(data, 0)


def _ipv4(data: bytes, offset: int) -> DecodeResult:
    end = len(data)
    if end < offset + 20:
        return MALFORMED
    version_ihl = data[offset]
    if version_ihl == 0x45:  # no options: the common case
        transport = offset + 20
    else:
        header_length = (version_ihl & 0x0F) * 4
        if version_ihl >> 4 != 4 or header_length < 20 or end < offset + header_length:
            return MALFORMED
        transport = offset + header_length
    ip_proto = data[offset + 9]
    src = data[offset + 12:offset + 16]
    dst = data[offset + 16:offset + 20]
    if data[offset + 6] & 0x1F or data[offset + 7]:  # fragment offset: no transport header here
        return (src, dst, ip_proto, -1, -1)
    return _transport(data, transport, src, dst, ip_proto)


def _ipv6(data: bytes, offset: int) -> DecodeResult:
    if len(data) < offset + 40 or data[offset] >> 4 != 6:
        return MALFORMED
    src = data[offset + 8:offset + 24]
    dst = data[offset + 24:offset + 40]
    next_header = data[offset + 6]
    position = offset + 40
    end = len(data)
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
            return _transport(data, position, src, dst, next_header)
    # The extension chain runs past the captured bytes: the IP header is sound, the ports unknown.
    return (src, dst, next_header, -1, -1)


def _transport(data: bytes, offset: int, src: bytes, dst: bytes, ip_proto: int) -> Decoded:
    if ip_proto == IPPROTO_TCP:
        readable = len(data) >= offset + 20
    elif ip_proto == IPPROTO_UDP:
        readable = len(data) >= offset + 8
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
    LINKTYPE_IPV4: _raw_ipv4,
    LINKTYPE_IPV6: _raw_ipv6,
    LINKTYPE_LINUX_SLL2: _linux_sll2,
}
