"""The compiled record walker and its Python fallback find the same records, stop at the same place."""
import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter import walk

pytestmark = pytest.mark.skipif(not walk.native(), reason="exporter/native/walk.so is not built")


def both(function, *args):
    native = function(*args)
    saved, walk._native = walk._native, None
    try:
        fallback = function(*args)
    finally:
        walk._native = saved
    return native, fallback


def pcap_buffer(lengths, order, junk, cut):
    records = b"".join(struct.pack(order + "IIII", 1, 2, length, length + 7) + bytes([length % 251]) * length
                       for length in lengths)
    return (junk + records)[:len(junk) + len(records) - cut]


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(0, 300), max_size=50), order=st.sampled_from("<>"),
       junk=st.binary(max_size=5), cut=st.integers(0, 40), limit=st.integers(1, 60),
       max_captured=st.sampled_from([100, 300, 2**28]), units=st.sampled_from([None, 1e6, 1e9]))
def test_pcap_records_native_and_python_agree(lengths, order, junk, cut, limit, max_captured, units):
    buffer = pcap_buffer(lengths, order, junk, min(cut, len(lengths) and 40))
    (native_offsets, native_stop, native_corrupt, native_times), (offsets, stop, corrupt, times) = both(
        walk.pcap_records, buffer, len(junk), order, limit, max_captured, units)
    assert native_offsets.tolist() == offsets.tolist()
    assert (native_stop, native_corrupt) == (stop, corrupt)
    if units is None:
        assert native_times is None and times is None
    else:  # every record: 1 s and 2 units
        assert native_times.tolist() == times.tolist() == [1 + 2 / units] * len(offsets)
    # and both are right: each offset is where a record of the expected length starts
    expected, position = [], len(junk)
    for length in lengths:
        if len(expected) == limit or position + 16 > len(buffer):
            break
        if length > max_captured or position + 16 + length > len(buffer):
            break
        expected.append(position)
        position += 16 + length
    assert offsets.tolist() == expected


def test_chained_records_native_and_python_agree():
    rng = random.Random(5)
    buffer, offsets, position = bytearray(), [], 0
    for _ in range(200):
        size = rng.randrange(16, 400, 16)
        offsets.append(position)
        buffer += struct.pack("=I", size) + bytes(size - 4)
        position += size
    native, fallback = both(walk.chained_records, bytes(buffer), 0, len(offsets))
    assert native.tolist() == fallback.tolist() == offsets
    assert isinstance(native, np.ndarray)
