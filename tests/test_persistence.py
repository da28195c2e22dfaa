"""--state-file: atomic save, restore round trip, and a fresh start on bad files."""
import ipaddress
import json
import logging

from exporter.persistence import PeriodicSaver, restore, save_state
from exporter.tally import Tally


def filled_tally():
    tally = Tally()
    packed = ipaddress.ip_address("198.51.100.7").packed
    tally.record({(packed, "in", "HTTP"): [1500, 3], (packed, "out", "HTTP"): [400, 2]}, {"not_ip": 4})
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


def test_restore_respects_the_client_cap(tmp_path):
    path = str(tmp_path / "state.json")
    save_state(path, {"tally": filled_tally().export_state()})
    capped = Tally(max_clients=0)
    restore(path, {"tally": capped.prepare_restore})
    assert set(capped.snapshot().series) == {("other", "in", "HTTP"), ("other", "out", "HTTP")}


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
