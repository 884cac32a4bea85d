"""The parts of pool runs that need no workers: run records in the store, shared results, worker slots, heartbeats."""

from __future__ import annotations

import time

import pytest

from flows.batch_cli import worker_slots
from flows.pairs import PairResult
from flows.pool import heartbeat, heartbeat_key
from flows.run_records import RunRecord, find_record, save_record
from infra.artifacts import open_store
from infra.settings import Settings
from tasks.calibrate import CalibrationSpec, make_calibration
from tasks.fetch import snapshot_model
from tests.conftest import WIKITEXT_VALID


def _record(**changes) -> RunRecord:
    values = {
        "flow_run_id": "5c1c7a9e-run",
        "flow_run_name": "nightly",
        "batch": "nightly",
        "config": {"name": "nightly"},
        "mlflow_run_id": "abc",
        "pairs": [("m1", "a"), ("m1", "b"), ("m2", "a")],
    }
    return RunRecord(**(values | changes))


def test_unfinished_pairs_are_the_failed_and_the_missing():
    done = PairResult(model="m1", recipe_name="a", status="completed")
    failed = PairResult(model="m1", recipe_name="b", status="failed", error="boom")
    record = _record(results=[done, failed])
    assert record.unfinished_pairs() == [["m1", "b"], ["m2", "a"]]


def test_a_run_record_is_found_from_another_state_dir_through_the_store(tmp_path):
    store = str(tmp_path / "store")
    save_record(Settings(home=tmp_path / "machine-a", artifacts=store), _record())
    elsewhere = Settings(home=tmp_path / "machine-b", artifacts=store)
    assert find_record(elsewhere, "5c1c7a9e-run").pairs == [("m1", "a"), ("m1", "b"), ("m2", "a")]
    assert find_record(elsewhere, "nightly").flow_run_id == "5c1c7a9e-run", "a batch name finds its latest run"
    with pytest.raises(LookupError, match="no batch run 'other'"):
        find_record(elsewhere, "other")


def test_worker_slots_pin_one_gpu_each_or_share_the_cpu_threads():
    slots = worker_slots("0,3", 1)
    assert [name for name, _ in slots] == ["gpu0", "gpu3"]
    assert slots[1][1] == {"CUDA_VISIBLE_DEVICES": "3", "SECATEUR_DEVICE": "cuda"}
    cpu = worker_slots(None, 2)
    assert len(cpu) == 2 and all(int(env["OMP_NUM_THREADS"]) >= 1 for _, env in cpu)
    with pytest.raises(ValueError, match="GPU indices"):
        worker_slots("0,x", 1)


def test_a_heartbeat_is_written_while_its_block_runs_and_stops_after(tmp_path):
    store = open_store(str(tmp_path / "store"))
    with heartbeat(store, "run-1", every=0.05):
        time.sleep(0.2)
        first = float(store.read_text(heartbeat_key("run-1")))
        time.sleep(0.2)
        assert float(store.read_text(heartbeat_key("run-1"))) > first
    last = store.read_text(heartbeat_key("run-1"))
    time.sleep(0.2)
    assert store.read_text(heartbeat_key("run-1")) == last


def test_a_calibration_set_made_on_one_machine_is_reused_on_another(tmp_path, tiny_model_dir, monkeypatch):
    store = str(tmp_path / "store")
    spec = CalibrationSpec(data=str(WIKITEXT_VALID), samples=4, seq_len=32)
    first = Settings(home=tmp_path / "a", artifacts=store, share_results=True)
    made = make_calibration(snapshot_model(str(tiny_model_dir), first), spec, first)
    second = Settings(home=tmp_path / "b", artifacts=store, share_results=True)
    monkeypatch.setattr("tasks.calibrate._write_calibration", lambda *a: pytest.fail("computed again"))
    reused = make_calibration(snapshot_model(str(tiny_model_dir), second), spec, second)
    assert reused.fingerprint == made.fingerprint and reused.path.startswith(str(tmp_path / "b"))
    assert open(reused.path, "rb").read() == open(made.path, "rb").read()
