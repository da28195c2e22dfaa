"""--state-file: atomic save, restore round trip, and a fresh start on bad files."""
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compat_api.history import History
from exporter.persistence import PeriodicSaver, restore, save_state
from exporter.tally import RESULTS, Tally
from tests.builders import batch_counts


def filled_tally():
    tally = Tally()
    tally.record(batch_counts({("198.51.100.7", "in", "HTTP"): (1500, 3), ("198.51.100.7", "out", "HTTP"): (400, 2)},
                              {"not_ip": 4}))
    return tally


def test_round_trip_restores_counters(tmp_path):
    path = str(tmp_path / "state.json")
    saved = filled_tally()
    save_state(path, {"tally": saved.export_state()})
    fresh = Tally()
    assert restore(path, {"tally": fresh.prepare_restore})
    assert fresh.snapshot().series == saved.snapshot().series
    assert fresh.snapshot().results == saved.snapshot().results
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind


def test_restore_beyond_the_client_cap_ends_series_but_keeps_totals(tmp_path):
    path = str(tmp_path / "state.json")
    save_state(path, {"tally": filled_tally().export_state()})
    capped = Tally(max_clients=0)
    restore(path, {"tally": capped.prepare_restore})
    snapshot = capped.snapshot()
    assert snapshot.series == {}  # nothing moves into "other": Prometheus already counted those bytes
    assert snapshot.total_series == {("in", "HTTP"): (1500, 3), ("out", "HTTP"): (400, 2)}


def test_periodic_saver_writes_on_stop(tmp_path):
    path = tmp_path / "state.json"
    saver = PeriodicSaver(str(path), lambda: {"tally": filled_tally().export_state()}, interval=3600)
    saver.start()
    saver.stop()
    assert json.loads(path.read_text())["tally"]["results"]["not_ip"] == 4


def test_missing_corrupt_or_foreign_files_mean_a_fresh_start(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    tally = filled_tally()
    before = tally.snapshot().series
    cases = {"missing.json": None, "corrupt.json": '{"format": "traffic-exp', "foreign.json": '{"a": 1}',
             "old.json": '{"format": "traffic-exporter-state", "version": 0}',
             "shape.json": '{"format": "traffic-exporter-state", "version": 1, "tally": {"clients": {"x": [["up", "HTTP", 1, 1]]}}}'}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        assert not restore(str(tmp_path / name), {"tally": tally.prepare_restore})
    assert tally.snapshot().series == before
    assert sum("starting fresh" in record.message for record in caplog.records) == len(cases)


def saved_document(tmp_path, tally=None, history=None):
    """A state file as the exporter writes it, loaded back as a dict for tampering."""
    path = tmp_path / "state.json"
    parts = {"tally": (tally or filled_tally()).export_state()}
    if history is not None:
        parts["history"] = history.export_state()
    save_state(str(path), parts)
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("tamper, text_change", [
    (lambda d: d["tally"]["results"].__setitem__("not_ip", 10**400), None),
    (lambda d: d["tally"]["results"].__setitem__("not_ip", -1), None),
    (lambda d: d["tally"].__setitem__("evictions", -3), None),
    (lambda d: d["tally"].__setitem__("evictions", True), None),
    (lambda d: d["tally"]["totals"][0].__setitem__(2, 1.5), None),
    (lambda d: d["tally"]["clients"]["198.51.100.7"]["counters"][0].__setitem__(3, -1), None),
    (lambda d: d["tally"]["clients"].__setitem__("not-an-address", {"idle_seconds": 0, "counters": []}), None),
    (lambda d: d["tally"]["clients"]["198.51.100.7"].__setitem__("idle_seconds", -5), None),
    (lambda d: d["tally"]["results"].__setitem__("not_ip", 123456789), ("123456789", "Infinity")),
    (lambda d: d["tally"]["results"].__setitem__("not_ip", 123456789), ("123456789", "NaN")),
])
def test_out_of_range_or_mistyped_counters_mean_a_fresh_start(tmp_path, caplog, tamper, text_change):
    path, document = saved_document(tmp_path)
    tamper(document)
    text = json.dumps(document)
    if text_change:
        text = text.replace(*text_change)
    path.write_text(text)
    tally = Tally()
    caplog.set_level(logging.WARNING)
    assert not restore(str(path), {"tally": tally.prepare_restore})
    assert tally.snapshot().results == dict.fromkeys(RESULTS, 0)
    assert "starting fresh" in caplog.text


def test_a_history_second_in_the_future_means_a_fresh_start(tmp_path, caplog):
    tally = filled_tally()
    history = History(tally, 60)
    history.tick(time.time())
    path, document = saved_document(tmp_path, tally, history)
    document["history"]["stored"][1] = int(time.time()) + 3600
    document["history"]["seconds"][-1][0] = int(time.time()) + 3600
    path.write_text(json.dumps(document))
    fresh_tally, fresh_history = Tally(), History(Tally(), 60)
    caplog.set_level(logging.WARNING)
    assert not restore(str(path), {"tally": fresh_tally.prepare_restore, "history": fresh_history.prepare_restore})
    assert fresh_tally.snapshot().total_series == {}  # all or nothing: the tally is not restored either
    assert "future" in caplog.text


def test_a_version_1_file_is_upgraded(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({
        "format": "traffic-exporter-state", "version": 1, "saved_at": 0,
        "tally": {"clients": {"198.51.100.7": [["in", "HTTP", 1500, 3]]}, "other": [["out", "DNS", 70, 1]],
                  "results": {"counted": 4, "not_ip": 2}, "evictions": 1},
        "history": [[int(time.time()) - 5, [["in", "HTTP", 1500, 3]], {"198.51.100.7": [["in", "HTTP", 1500]]}]],
    }))
    tally = Tally()
    history = History(tally, 60)
    assert restore(str(path), {"tally": tally.prepare_restore, "history": history.prepare_restore})
    snapshot = tally.snapshot()
    assert snapshot.series == {("198.51.100.7", "in", "HTTP"): (1500, 3), ("other", "out", "DNS"): (70, 1)}
    assert snapshot.total_series == {("in", "HTTP"): (1500, 3), ("out", "DNS"): (70, 1)}
    assert snapshot.evictions == 1
    assert history.clients_window(60).clients == ["198.51.100.7"]


def test_idle_time_survives_a_restart(tmp_path):
    clock = [1000.0]
    saved = Tally(client_idle_seconds=60, clock=lambda: clock[0])
    saved.record(batch_counts({("198.51.100.7", "in", "HTTP"): (10, 1)}))
    clock[0] += 50
    path = str(tmp_path / "state.json")
    save_state(path, {"tally": saved.export_state()})
    later = [5000.0]
    restored = Tally(client_idle_seconds=60, clock=lambda: later[0])
    assert restore(path, {"tally": restored.prepare_restore})
    later[0] += 11  # 61 s idle in all
    restored.expire()
    assert restored.snapshot().evictions == 1


def test_temporary_files_of_an_interrupted_save_are_removed_at_start(tmp_path):
    path = tmp_path / "state.json"
    save_state(str(path), {"tally": filled_tally().export_state()})
    left_behind = tmp_path / ".state.json.k3j4h5.tmp"  # what a kill -9 during a save leaves
    left_behind.write_text('{"format": "traffic-exp')
    unrelated = tmp_path / ".other.json.abc.tmp"
    unrelated.write_text("not ours")
    assert restore(str(path), {"tally": Tally().prepare_restore})
    assert not left_behind.exists() and unrelated.exists()


def test_a_killed_save_leaves_only_a_file_the_next_start_removes(tmp_path):
    """kill -9 in the middle of save_state: the old state file is intact, the temporary file is cleaned."""
    path = tmp_path / "state.json"
    save_state(str(path), {"tally": filled_tally().export_state()})
    before = path.read_text()
    code = ("import sys, time, json\n"
            "from exporter import persistence\n"
            "def slow_dump(obj, file, **kw):\n"
            "    file.write('{\"format\"'); file.flush(); time.sleep(60)\n"
            "persistence.json.dump = slow_dump\n"
            f"persistence.save_state({str(path)!r}, {{'tally': {{}}}})\n")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 20
        while not list(tmp_path.glob(".state.json.*.tmp")):
            assert time.monotonic() < deadline and process.poll() is None, "the save did not start"
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        process.kill()
        process.wait(10)
    assert path.read_text() == before and list(tmp_path.glob(".state.json.*.tmp"))
    assert restore(str(path), {"tally": Tally().prepare_restore})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_tcp_health_survives_a_restart_per_client_in_other_and_in_totals(tmp_path):
    from tests.tcp_traffic import tcp_health_tally

    saved, _ = tcp_health_tally(tmp_path, max_clients=2)
    path = str(tmp_path / "state.json")
    save_state(path, {"tally": saved.export_state()})
    fresh = Tally(max_clients=2, max_tcp_flows=1000)
    assert restore(path, {"tally": fresh.prepare_restore})
    before, after = saved.snapshot(), fresh.snapshot()
    assert after.clients == before.clients
    assert (after.tcp == before.tcp).all() and (after.tcp_totals == before.tcp_totals).all()
    assert before.tcp_totals.sum() > 0 and before.tcp[0].sum() > 0  # "other" holds two clients' health


def test_a_version_2_file_restores_with_tcp_health_at_zero_and_health_is_ignored_when_off(tmp_path):
    from tests.tcp_traffic import tcp_health_tally

    path = tmp_path / "state.json"
    save_state(str(path), {"tally": tcp_health_tally(tmp_path)[0].export_state()})
    document = json.loads(path.read_text())
    off = Tally()  # TCP health off: the saved health is not read
    assert restore(str(path), {"tally": off.prepare_restore}) and off.snapshot().tcp is None
    del document["tally"]["tcp"]
    document["version"] = 2
    path.write_text(json.dumps(document))
    on = Tally(max_tcp_flows=10)
    assert restore(str(path), {"tally": on.prepare_restore})
    assert not on.snapshot().tcp.any() and on.snapshot().series


@pytest.mark.parametrize("tamper", [
    lambda tcp: tcp["totals"].__setitem__("rtt_buckets", [1] * 13),
    lambda tcp: tcp["totals"].__setitem__("segments", [1, -1]),
    lambda tcp: tcp["other"]["handshakes"].__setitem__("GOPHER", 1),
    lambda tcp: tcp["other"].__setitem__("extra", 1),
    lambda tcp: tcp["clients"].__setitem__("192.0.2.99", tcp["other"]),  # a client without byte counters
    lambda tcp: tcp["totals"].__setitem__("rtt_sum_ns", 2.5),
])
def test_bad_tcp_health_in_a_state_file_means_a_fresh_start(tmp_path, caplog, tamper):
    from tests.tcp_traffic import tcp_health_tally

    path = tmp_path / "state.json"
    save_state(str(path), {"tally": tcp_health_tally(tmp_path)[0].export_state()})
    document = json.loads(path.read_text())
    tamper(document["tally"]["tcp"])
    path.write_text(json.dumps(document))
    tally = Tally(max_tcp_flows=10)
    caplog.set_level(logging.WARNING)
    assert not restore(str(path), {"tally": tally.prepare_restore})
    assert "starting fresh" in caplog.text and not tally.snapshot().series
