"""Batches of frames located in one buffer."""


from exporter.decode import LINKTYPE_ETHERNET
from tests.builders import Frame, batch_of, frames_of


def test_batch_of_and_part_keep_frames_and_their_order():
    frames = [Frame(60 + index, bytes([index]) * (10 + index)) for index in range(5)]
    batch = batch_of(LINKTYPE_ETHERNET, frames)
    assert frames_of(batch) == frames and len(batch) == 5
    assert frames_of(batch.part(1, 3)) == frames[1:3]
    assert not batch_of(LINKTYPE_ETHERNET, [])
