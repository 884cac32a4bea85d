"""The parts of pool runs that need no workers: run records in the store, shared results, worker slots, heartbeats."""

from __future__ import annotations

import json
import time

import pytest
from prefect import flow

from flows.pairs import PairResult
from flows.pool import heartbeat, heartbeat_key
from flows.run_records import RunRecord, find_record, save_record
from flows.workers import worker_slots
from infra.artifacts import open_store
from infra.settings import Settings
from tasks.calibrate import CalibrationSpec, make_calibration
from tasks.fetch import snapshot_model
from tests.conftest import WIKITEXT_TEST, WIKITEXT_VALID


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


@flow
def _prepare_here(model: str, calibration: CalibrationSpec, evaluation) -> dict[str, str]:
    from flows.pair_stages import PairStages

    stages = PairStages(Settings())
    stages.prepare(model, calibration, evaluation)
    return stages.states


def test_prefect_results_of_a_pool_are_in_the_store_and_hold_no_local_path(
    prefect_api, tmp_path, tiny_model_dir, monkeypatch
):
    from tasks.evaluate import EvaluationSpec

    monkeypatch.setenv("SECATEUR_ARTIFACTS", str(tmp_path / "store"))
    monkeypatch.setenv("SECATEUR_SHARE_RESULTS", "true")
    spec = CalibrationSpec(data=str(WIKITEXT_VALID), samples=4, seq_len=32)
    evaluation = EvaluationSpec(perplexity=[str(WIKITEXT_TEST)], seq_len=32, max_tokens=256, generation_tokens=0)
    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "machine-a"))
    first = _prepare_here(str(tiny_model_dir), spec, evaluation)
    assert first == {"fetch": "Completed", "calibrate": "Completed", "evaluate_dense": "Completed"}
    records = list((tmp_path / "store" / "prefect-results").iterdir())
    assert len(records) == 2 and not (tmp_path / "machine-a" / "prefect-results").exists()
    for record in records:
        text = record.read_text()
        assert str(tmp_path / "machine-a") not in text and json.loads(text)["metadata"]["storage_key"] == record.name
    assert any("$SECATEUR_HOME/calibration/" in record.read_text() for record in records)

    # Another machine: Prefect's cache finds both records; the calibration set comes from the store, not computed.
    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "machine-b"))
    monkeypatch.setattr("tasks.calibrate._write_calibration", lambda *a: pytest.fail("computed again"))
    monkeypatch.setattr("tasks.evaluate.evaluate_folder", lambda *a, **k: pytest.fail("evaluated again"))
    second = _prepare_here(str(tiny_model_dir), spec, evaluation)
    assert second == {"fetch": "Completed", "calibrate": "Cached", "evaluate_dense": "Cached"}
    assert list((tmp_path / "machine-b" / "calibration").glob("*")), "the set was fetched into this state dir"
