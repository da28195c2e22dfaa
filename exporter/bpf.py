"""Capture filters: compiled by libpcap (through Scapy), adapted for the kernel, attached to a socket."""
from __future__ import annotations

import ctypes
import re
import socket
import struct

from .decode import SLL_HEADER_LENGTH
from .frames import SourceError

# Bytes of each frame the filter keeps: every header the decoder reads (Ethernet, VLAN tags, IPv4
# options or IPv6 extension headers, ports) fits; lengths come from the kernel's frame length.
CAPTURE_SNAPLEN = 256
SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>
BPF_INSTRUCTION = struct.Struct("=HBBI")  # code, jt, jf, k
# BPF opcode fields <linux/filter.h>
BPF_LD, BPF_LDX, BPF_RET = 0x00, 0x01, 0x06
BPF_ABS, BPF_IND, BPF_MSH = 0x20, 0x40, 0xA0
BPF_K = 0x00
SKF_AD_OFF = -0x1000 & 0xFFFFFFFF
SKF_AD_PROTOCOL, SKF_AD_PKTTYPE = 0, 4
ACCEPT_HEADERS = [(BPF_RET | BPF_K, 0, 0, CAPTURE_SNAPLEN)]  # the program without a filter

Program = list[tuple[int, int, int, int]]


class FilterError(SourceError):
    """The BPF filter does not compile; the message is the compiler's."""


def compile_bpf(expression: str, link_type: int) -> Program:
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


def adapt_bpf_for_kernel(program: Program, cooked: bool) -> Program:
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


def attach_bpf(sock: socket.socket, program: Program) -> None:
    """Attach a compiled program to a socket (SO_ATTACH_FILTER takes a struct sock_fprog)."""
    instructions = ctypes.create_string_buffer(b"".join(BPF_INSTRUCTION.pack(*insn) for insn in program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    struct.pack("HL", len(program), ctypes.addressof(instructions)))
