"""A batch on a Prefect work pool: a real API, two `secateur worker` processes with own state dirs, one lost."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import batch_mapping, save_tiny

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
POOL = "test-pool"
RECIPES = [
    {"name": "sgpt50", "method": "sparsegpt", "sparsity": 0.5},
    {"name": "sgpt24", "method": "sparsegpt", "pattern": "2:4"},
    {"name": "sgpt60", "method": "sparsegpt", "sparsity": 0.6},
]


def _start_worker(home: Path, env: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "flows.cli", "worker", "--pool", POOL, "--slots", "1"]
    log = open(home.parent / f"{home.name}-worker.log", "wb")
    return subprocess.Popen(command, env={**env, "SECATEUR_HOME": str(home)}, cwd=ROOT, stdout=log, stderr=log)


def _kill_tree(process: subprocess.Popen) -> None:
    """kill -9 of a worker machine's processes: the worker CLI, the Prefect worker, its flow-run process."""
    parent = psutil.Process(process.pid)
    for child in [*parent.children(recursive=True), parent]:
        child.kill()
    process.wait()


def _busy_with_second_pair(home: Path) -> bool:
    """This worker finished a pair's flow run and is three blocks into the prune of another."""
    log = (home.parent / f"{home.name}-worker.log").read_text(errors="replace")
    finished = re.search(r"Flow run 'sgpt\w+' - Finished in state Completed", log)
    return finished is not None and any(home.glob("work/*/checkpoints/block-0002"))


def test_a_batch_fans_out_over_two_workers_and_survives_losing_one(prefect_api, tmp_path, tiny_tokenizer):
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    models = [str(save_tiny(tmp_path / "deep-0", tiny_tokenizer, num_hidden_layers=8))]
    mapping = batch_mapping(models, RECIPES, name="pool-batch")
    mapping["calibration"].update(samples=32, seq_len=128)
    mapping["evaluation"]["generation_tokens"] = 0
    batch = tmp_path / "batch.yaml"
    batch.write_text(yaml.safe_dump(mapping))
    shared = {
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "SECATEUR_ARTIFACTS": str(tmp_path / "store"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "SECATEUR_MIRROR_CHECKPOINTS": "true",
        "SECATEUR_HEARTBEAT_SECONDS": "1",
        "SECATEUR_STALE_AFTER_SECONDS": "8",
        "SECATEUR_POLL_SECONDS": "0.5",
        "PYTHONPATH": str(ROOT),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SECATEUR_", "MLFLOW_"))} | shared
    homes = [tmp_path / "worker-a", tmp_path / "worker-b"]
    workers = [_start_worker(home, env) for home in homes]
    batch_run = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(batch), "--pool", POOL, "--json"],
        env={**env, "SECATEUR_HOME": str(tmp_path / "batch-home")},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    killed = None
    try:
        deadline = time.monotonic() + 600
        while killed is None and batch_run.poll() is None and time.monotonic() < deadline:
            for index, home in enumerate(homes):
                if _busy_with_second_pair(home):
                    _kill_tree(workers[index])
                    killed = index
                    break
            time.sleep(0.01)
        stdout, stderr = batch_run.communicate(timeout=600)
    finally:
        for worker in workers:
            if worker.poll() is None:
                _kill_tree(worker)
    assert killed is not None, f"no worker was caught in its second prune: {stderr.decode()[-2000:]}"
    assert batch_run.returncode == 0, stderr.decode()[-3000:]
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    results = summary["results"]
    assert len(results) == 3 and all(r["status"] == "completed" for r in results), results

    # Pairs ran on both workers; the one lost with its worker ran again and resumed from mirrored checkpoints.
    record = json.loads(next((tmp_path / "batch-home" / "runs").glob("*.json")).read_text())
    pairs = record["results"]
    assert {p["worker"].split(":", 1)[1] for p in pairs} == {str(h.resolve()) for h in homes}
    rerun = [p for p in pairs if p["attempts"] == 2]
    assert len(rerun) == 1 and str(homes[1 - killed].resolve()) in rerun[0]["worker"], pairs
    client = MlflowClient(tracking_uri=shared["MLFLOW_TRACKING_URI"])
    assert client.get_run(rerun[0]["mlflow_run_id"]).data.metrics["resumed_from_block"] > 0
    experiment = client.get_experiment_by_name("pool-batch")
    statuses = {r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert statuses == {"FINISHED"}, statuses
    assert not list((tmp_path / "store").glob("checkpoints/*/*")), "mirrored checkpoints are removed when done"

    # The resumed prune's weights equal those of an uninterrupted prune of the same pair.
    resumed_folder = next(
        p.parent
        for p in (homes[1 - killed] / "models").glob("*/*/*/sparsity.json")
        if json.loads(p.read_text())["resumed_from_block"] > 0
    )
    clean = _clean_prune(rerun[0], mapping, tmp_path / "clean-home")
    resumed, reference = load_file(resumed_folder / "model.safetensors"), load_file(clean / "model.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(resumed[name].equal(reference[name]) for name in resumed)


def _clean_prune(pair: dict, mapping: dict, home: Path) -> Path:
    from flows.batch_config import BatchConfig
    from infra.settings import Settings
    from tasks.calibrate import make_calibration
    from tasks.fetch import snapshot_model
    from tasks.prune import prune_with_checkpoints

    batch = BatchConfig.model_validate(mapping)
    entry = next(e for e in batch.recipes if e.name == pair["recipe_name"])
    settings = Settings(home=home)
    snapshot = snapshot_model(pair["model"], settings)
    calibration = make_calibration(snapshot, batch.calibration, settings)
    return Path(prune_with_checkpoints(snapshot, calibration, entry.recipe(batch.calibration), settings).path)
