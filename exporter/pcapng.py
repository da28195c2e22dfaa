"""pcapng files and streams (draft-ietf-opsawg-pcapng), walked block by block as chunks arrive: where frames lie."""
from __future__ import annotations

import struct
from typing import BinaryIO, Callable, Iterable, Iterator, NamedTuple, Optional

from .frames import BATCH_FRAMES, MAX_RECORD, FrameBatch, SourceError, check_link_type
from .pcap import NO_LINK_TYPE, Arrivals

READ_CHUNK = 1 << 24

# pcapng (draft-ietf-opsawg-pcapng): block types, byte-order magic, interface options
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"  # the section header block's type, the same in both byte orders

BLOCK_SECTION_HEADER = 0x0A0D0D0A

BLOCK_INTERFACE = 1

BLOCK_OBSOLETE_PACKET = 2

BLOCK_SIMPLE_PACKET = 3

BLOCK_ENHANCED_PACKET = 6

PCAPNG_BYTE_ORDERS = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}

PCAPNG_VERSIONS = {(1, 0), (1, 2)}  # 1.2: written by old tools for 1.0 files (libpcap reads both)

OPTION_END = 0

IF_TSRESOL = 9

IF_TSOFFSET = 14


def read_pcapng(chunks: Iterable[Optional[bytes]], path: str, timestamps: bool, *, stream: bool = False
                ) -> Iterator[FrameBatch]:
    """Walk a pcapng file or stream block by block as its chunks arrive, noting where frames lie: no copy per frame.

    Each section has its own byte order and interfaces; each packet block refers to an interface
    its section described before it. Other blocks (statistics, names, custom...) are skipped.
    A simple packet block has no timestamp: its timestamp is None. A chunk of None means nothing
    arrived for a while (a stream): an empty batch.
    """
    arrivals = Arrivals(chunks)
    buffer, base, position = b"", 0, 0  # the walk: buffer[position] is at byte base + position of the input
    order = "<"  # until the section header says otherwise
    head, word, enhanced, obsolete = _pcapng_structs(order)
    interfaces: list[_Interface] = []
    checked: set[int] = set()  # link types known to be supported
    link_type = NO_LINK_TYPE
    spans: list[tuple[int, int, int]] = []
    times: list[Optional[float]] = []
    wanted = 12  # bytes from the walk's position needed before walking again: a block head, or a whole block

    def corrupt(problem: str) -> SourceError:
        return SourceError(f"{path}: corrupt pcapng block at byte {base + position}: {problem}")

    try:
        while True:
            if not arrivals.fill(wanted):
                if arrivals.ended:
                    break
                yield FrameBatch.empty(link_type)
                continue
            buffer, base, position = arrivals.buffer, arrivals.base, arrivals.position
            end = len(buffer)
            wanted = 12
            while position + 12 <= end:
                block_type, length = head(buffer, position)
                if block_type == BLOCK_SECTION_HEADER:
                    order = _section_byte_order(buffer, position, corrupt)
                    head, word, enhanced, obsolete = _pcapng_structs(order)
                    length = word(buffer, position + 4)[0]
                if length & 3 or length < 12 or length > MAX_RECORD:
                    raise corrupt(f"block length {length} (a multiple of 4 from 12 to {MAX_RECORD} expected)")
                following = position + length
                if following > end:
                    wanted = length  # the block goes on in the next chunks
                    break
                trailing = word(buffer, following - 4)[0]
                if trailing != length:
                    raise corrupt(f"trailing block length {trailing} differs from the leading {length}")
                if block_type == BLOCK_ENHANCED_PACKET:
                    if length < 32:
                        raise corrupt(f"packet block length {length} is below 32")
                    interface_id, high, low, captured, wire_length = enhanced(buffer, position + 8)
                    if captured > length - 32:
                        raise corrupt(f"captured length {captured} goes beyond the block")
                    start = position + 28
                elif block_type == BLOCK_SIMPLE_PACKET:
                    if length < 16:
                        raise corrupt(f"simple packet block length {length} is below 16")
                    if not interfaces:
                        raise corrupt("simple packet block before any interface description in its section")
                    interface_id, high = 0, None
                    wire_length = word(buffer, position + 8)[0]
                    # No captured length here; the spec's rule: the original length, cut by interface 0's
                    # snaplen (0: none) and by the room in the block.
                    captured = min(wire_length, length - 16, interfaces[0].snaplen or length)
                    start = position + 12
                elif block_type == BLOCK_OBSOLETE_PACKET:
                    if length < 32:
                        raise corrupt(f"packet block length {length} is below 32")
                    interface_id, high, low, captured, wire_length = obsolete(buffer, position + 8)
                    if captured > length - 32:
                        raise corrupt(f"captured length {captured} goes beyond the block")
                    start = position + 28
                else:
                    if block_type == BLOCK_SECTION_HEADER:
                        _check_section_header(buffer, position, length, order, corrupt)
                        interfaces = []
                    elif block_type == BLOCK_INTERFACE:
                        interfaces.append(_interface(buffer, position, length, order, corrupt))
                    position = following
                    continue
                try:
                    interface = interfaces[interface_id]
                except IndexError:
                    raise corrupt(f"packet on interface {interface_id}, but its section describes "
                                  f"{len(interfaces)} interface(s) before it") from None
                if interface.link_type != link_type:  # a batch has one link type
                    if interface.link_type not in checked:
                        check_link_type(interface.link_type, path)
                        checked.add(interface.link_type)
                    if spans:
                        yield FrameBatch.from_spans(link_type, buffer, spans, times if timestamps else None)
                        spans, times = [], []
                    link_type = interface.link_type
                spans.append((start, start + captured, wire_length or captured))
                if timestamps:
                    times.append(None if high is None else ((high << 32) | low) / interface.units + interface.offset)
                position = following
                if len(spans) == BATCH_FRAMES:
                    yield FrameBatch.from_spans(link_type, buffer, spans, times if timestamps else None)
                    spans, times = [], []
            arrivals.position = position
            if spans:  # they locate frames in this buffer: hand them over before the next chunk
                yield FrameBatch.from_spans(link_type, buffer, spans, times if timestamps else None)
                spans, times = [], []
    except SourceError:
        if spans:  # the frames before the problem count
            yield FrameBatch.from_spans(link_type, buffer, spans, times if timestamps else None)
        raise
    if arrivals.left:
        raise SourceError(f"{path}: truncated {'stream' if stream else 'file'} "
                          f"(block at byte {arrivals.base + arrivals.position} incomplete)")


def file_chunks(file: BinaryIO) -> Iterator[bytes]:
    """A file in pieces of READ_CHUNK bytes."""
    return iter(lambda: file.read(READ_CHUNK), b"")


class _Interface(NamedTuple):
    """What a pcapng interface description says about the packets that refer to it."""

    link_type: int
    snaplen: int  # 0: no limit
    units: int  # timestamp units per second (if_tsresol)
    offset: int  # seconds added to every timestamp (if_tsoffset)


def _pcapng_structs(order: str) -> tuple[Callable, ...]:
    """Readers of a section's block head, 32-bit word, and enhanced and obsolete packet block fields."""
    return (struct.Struct(order + "II").unpack_from, struct.Struct(order + "I").unpack_from,
            struct.Struct(order + "IIIII").unpack_from,  # interface, timestamp high and low, captured, wire
            struct.Struct(order + "H2xIIII").unpack_from)  # the same after a 16-bit interface (and drops)


def _section_byte_order(buffer: bytes, position: int, corrupt: Callable[[str], SourceError]) -> str:
    magic = buffer[position + 8:position + 12]
    if magic not in PCAPNG_BYTE_ORDERS:
        raise corrupt(f"section header without the byte-order magic (found {magic.hex()})")
    return PCAPNG_BYTE_ORDERS[magic]


def _check_section_header(buffer: bytes, position: int, length: int, order: str,
                          corrupt: Callable[[str], SourceError]) -> None:
    if length < 28:
        raise corrupt(f"section header block length {length} is below 28")
    version = struct.unpack_from(order + "HH", buffer, position + 12)
    if version not in PCAPNG_VERSIONS:
        raise corrupt(f"unsupported pcapng version {version[0]}.{version[1]}")


def _interface(buffer: bytes, position: int, length: int, order: str,
               corrupt: Callable[[str], SourceError]) -> _Interface:
    """Read an interface description block: link type, snaplen and the timestamp options."""
    if length < 20:
        raise corrupt(f"interface description block length {length} is below 20")
    link_type, snaplen = struct.unpack_from(order + "H2xI", buffer, position + 8)
    units, offset = 10 ** 6, 0
    option = position + 16
    options_end = position + length - 4
    while option + 4 <= options_end:
        code, size = struct.unpack_from(order + "HH", buffer, option)
        value = option + 4
        if value + size > options_end:
            raise corrupt(f"option {code} of {size} bytes goes beyond the block")
        if code == OPTION_END:
            break
        if code == IF_TSRESOL:
            if size != 1:
                raise corrupt(f"if_tsresol option of {size} bytes (1 expected)")
            exponent = buffer[value]
            # Most significant bit set: a negative power of 2, else of 10.
            units = 2 ** (exponent & 0x7F) if exponent & 0x80 else 10 ** exponent
        elif code == IF_TSOFFSET:
            if size != 8:
                raise corrupt(f"if_tsoffset option of {size} bytes (8 expected)")
            offset = struct.unpack_from(order + "q", buffer, value)[0]
        option = value + size + (-size & 3)  # values are padded to 32 bits
    return _Interface(link_type, snaplen, units, offset)
