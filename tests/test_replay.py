"""Replays at their recorded pace, in loops that keep it, and files without frames."""
import logging
import time

import pytest

from exporter.decode import LINKTYPE_ETHERNET
from exporter.replay import PcapSource
from tests.capture_files import Pcapng, arrival_times, paced_file, pcap_header


def test_realtime_replay_releases_frames_at_their_recorded_pace(tmp_path):
    path = paced_file(tmp_path, [0.2] * 3)
    arrivals = arrival_times(PcapSource(str(path), realtime=True), 2)
    assert len(arrivals) == 4
    for index, arrival in enumerate(arrivals):
        assert index * 0.2 - 0.02 <= arrival < index * 0.2 + 0.15


def test_a_realtime_loop_keeps_the_recorded_rate_across_passes(tmp_path):
    # Span 0.6 s, mean gap 0.2 s: a pass every 0.8 s, frames 0.2 s apart, seams included.
    path = paced_file(tmp_path, [0.1, 0.3, 0.2])
    arrivals = arrival_times(PcapSource(str(path), realtime=True, loop=True), 2.3)
    expected = [0, 0.1, 0.4, 0.6, 0.8, 0.9, 1.2, 1.4, 1.6, 1.7, 2.0, 2.2]
    assert len(arrivals) == len(expected)
    for arrival, due in zip(arrivals, expected):
        assert due - 0.02 <= arrival < due + 0.15


def test_a_realtime_loop_over_one_frame_replays_it_once_a_second(tmp_path):
    path = paced_file(tmp_path, [])
    arrivals = arrival_times(PcapSource(str(path), realtime=True, loop=True), 2.5)
    assert len(arrivals) == 3
    for index, arrival in enumerate(arrivals):
        assert index - 0.02 <= arrival < index + 0.15


def test_paced_simple_packets_go_with_the_frame_before_them(tmp_path):
    file = Pcapng()
    file.section()
    file.interface(LINKTYPE_ETHERNET)
    file.simple(bytes(60))  # before any timestamp: at the start
    file.enhanced(0, 1_700_000_000 * 10**6, bytes(60))
    file.enhanced(0, 1_700_000_000 * 10**6 + 300_000, bytes(60))
    file.simple(bytes(60))
    path = file.write(tmp_path / "simple.pcapng")
    arrivals = arrival_times(PcapSource(str(path), realtime=True), 1)
    assert len(arrivals) == 4
    assert max(arrivals[:2]) < 0.1 and 0.28 <= arrivals[2] <= arrivals[3] < 0.4


@pytest.mark.parametrize("realtime", [False, True], ids=["max", "realtime"])
@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_an_empty_file_ends_the_replay_at_once_with_one_warning_even_in_a_loop(tmp_path, caplog, kind, realtime):
    if kind == "pcap":
        path = tmp_path / "empty.pcap"
        path.write_bytes(pcap_header(LINKTYPE_ETHERNET))
    else:
        file = Pcapng()
        file.section()
        file.interface(LINKTYPE_ETHERNET)
        path = file.write(tmp_path / "empty.pcapng")
    source = PcapSource(str(path), realtime=realtime, loop=True)
    with caplog.at_level(logging.WARNING):
        started = time.monotonic()
        assert arrival_times(source, 3) == [] and time.monotonic() - started < 1
        assert arrival_times(source, 3) == []  # once more: no second warning
    assert [record.getMessage() for record in caplog.records] == [f"{path} holds no frames"]
