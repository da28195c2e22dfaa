"""Capture: batch counting equals frame-by-frame classification; faults are logged, counted, and restart
a live capture but never count a replayed file twice."""
import ipaddress
import itertools
import logging
import random
import time

import pytest
from prometheus_client import generate_latest

from compat_api.app import create_app
from compat_api.history import History
from exporter.capture import Capture
from exporter.classify import DEFAULT_PORT_LABELS, ServerSet, classify
from exporter.collector import build_registry
from exporter.decode import decode_frame
from exporter.engine import FrameCounter
from exporter.replay import PcapSource
from tests.builders import AFS_PCAP, AFS_SERVER, Frame, LABELS, batch_of, random_frame, sums_of


def test_batch_counts_equal_frame_by_frame_classification():
    rng = random.Random(7)
    frames = [(*random_frame(rng), rng.randrange(60, 1600)) for _ in range(1000)]
    frames += frames[:300]  # repeated flows, within the batch and across batches
    decoded = [decode_frame(link, data) for link, data, _ in frames]
    servers = ServerSet({str(ipaddress.ip_address(d[0])) for d in decoded[:200] if not isinstance(d, str)})
    expected_counts, expected_ignored = {}, {}
    for (_, _, wire), key in zip(frames, decoded):
        result = key if isinstance(key, str) else classify(key, servers, DEFAULT_PORT_LABELS)
        if isinstance(result, str):
            expected_ignored[result] = expected_ignored.get(result, 0) + 1
        else:
            packed, direction, label = result
            counter = expected_counts.setdefault((str(ipaddress.ip_address(packed)), direction, label), [0, 0])
            counter[0] += wire
            counter[1] += 1
    counter = FrameCounter(servers, DEFAULT_PORT_LABELS, LABELS, client_index_capacity=400)  # ids start afresh
    counts, ignored = {}, {}
    batches = [batch_of(link, [Frame(wire, data) for _, data, wire in group])
               for start in range(0, len(frames), 256)
               for link, group in itertools.groupby(sorted(frames[start:start + 256], key=lambda f: f[0]),
                                                    key=lambda f: f[0])]
    for batch in batches:
        batch_counts = counter.count(batch)
        batch_ignored = batch_counts.ignored
        for key, (nbytes, packets) in sums_of(batch_counts).items():
            total = counts.setdefault(key, [0, 0])
            total[0] += nbytes
            total[1] += packets
        for reason, number in batch_ignored.items():
            ignored[reason] = ignored.get(reason, 0) + number
    assert counts == expected_counts and ignored == expected_ignored
    assert len(counts) > 100 and set(ignored) >= {"not_server"}


class FailingOnce:
    """A source reading a real pcap whose first reading raises in the middle, as a bug in the path would.

    ``kind`` says what it stands for: the replay itself, or a live capture, which never ends by itself
    (this one stops the capture at the end of its second reading, as the operator would).
    """

    def __init__(self, path, kind):
        self.inner = PcapSource(str(path))
        self.kind = kind
        self.restartable = kind == "live"
        self.name = self.inner.name
        self.failed = False

    def kernel_dropped(self):
        return 0

    def batches(self, stop):
        for batch in self.inner.batches(stop):
            if not self.failed:
                self.failed = True
                yield batch.part(0, 1)
                raise RuntimeError("injected fault")
            yield batch
        if self.kind == "live":
            stop.set()


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_exception_in_capture_is_logged_counted_and_restarted(caplog, monkeypatch, tally):
    monkeypatch.setattr("exporter.capture.INITIAL_BACKOFF_SECONDS", 0.05)
    source = FailingOnce(AFS_PCAP, kind="live")
    capture = Capture(source, tally, FrameCounter(ServerSet([AFS_SERVER]), DEFAULT_PORT_LABELS, LABELS))
    with caplog.at_level(logging.ERROR):
        capture.start()
        wait_for(lambda: not capture.thread.is_alive())
    status = capture.status()
    assert status.restarts == 1
    assert "injected fault" in caplog.text and "Traceback" in caplog.text
    # the restarted source was read again after the single frame counted before the fault
    assert status.frames == 601 + 1 == sum(tally.snapshot().results.values())
    assert status.error is None and not status.running
    # both readers still answer, and show the restart
    assert b"traffic_exporter_capture_restarts_total 1.0" in generate_latest(build_registry(tally, capture.status, lambda: ()))
    assert create_app(History(tally, 60), capture.status, lambda: (AFS_SERVER,)).test_client().get("/").status_code == 200


@pytest.mark.parametrize("loop", [False, True], ids=["once", "loop"])
def test_a_replay_failing_mid_file_is_reported_and_never_counted_again(caplog, monkeypatch, loop, tally):
    monkeypatch.setattr("exporter.capture.INITIAL_BACKOFF_SECONDS", 0.05)
    source = FailingOnce(AFS_PCAP, kind="pcap")
    source.inner.loop = loop
    capture = Capture(source, tally, FrameCounter(ServerSet([AFS_SERVER]), DEFAULT_PORT_LABELS, LABELS))
    with caplog.at_level(logging.ERROR):
        capture.start()
        try:
            wait_for(lambda: not capture.thread.is_alive(), timeout=3)
        finally:
            capture.stop()
    status = capture.status()
    assert status.frames == 1 == sum(tally.snapshot().results.values()) and status.restarts == 0
    assert status.error == "RuntimeError: injected fault" and not status.running
    assert "Traceback" in caplog.text and "not restarting" in caplog.text


def test_stop_interrupts_a_realtime_replay_quickly(tally):
    source = PcapSource(str(AFS_PCAP), realtime=True, loop=True)
    capture = Capture(source, tally, FrameCounter(ServerSet([AFS_SERVER]), DEFAULT_PORT_LABELS, LABELS))
    capture.start()
    wait_for(lambda: capture.status().running)
    started = time.monotonic()
    capture.stop()
    assert not capture.thread.is_alive() and time.monotonic() - started < 2
