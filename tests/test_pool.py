"""A batch on a Prefect work pool of the production stack (`secateur stack up --postgres`: PostgreSQL, a Prefect
server and an MLflow server on it), two warm `secateur worker` processes with own state dirs, one lost."""

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

# Starting a pool (PostgreSQL stack, deployment, two workers) takes minutes on 2 cores: make test-long.
pytestmark = [pytest.mark.slow, pytest.mark.long]

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


def _secateur(argv: list[str], env: dict, home: Path, cwd: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "flows.cli", *argv, "--json"]
    env = {**env, "SECATEUR_HOME": str(home)}
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _summary(process: subprocess.Popen, timeout: float = 600) -> tuple[int, dict, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    lines = stdout.decode().strip().splitlines()
    return process.returncode, json.loads(lines[-1]) if lines else {}, stderr.decode()[-3000:]


def _prepare_runs(api: str) -> dict[str, int]:
    """How many prepare-model flow runs each model had on the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    counts: dict[str, int] = {}
    for run in runs:
        if run.name.startswith("prepare"):
            counts[run.parameters["model"]] = counts.get(run.parameters["model"], 0) + 1
    return counts


@pytest.fixture(scope="module")
def pool_batch(postgres_stack, tmp_path_factory, tiny_tokenizer):
    """2 models x 3 recipes on two workers with their own state dirs: one worker is killed mid-prune; the second
    model's weights are cut short (its pairs fail), then mended and retried from a third state dir.

    The workers stay up for the module's tests and are killed at its end.
    """
    tmp_path = tmp_path_factory.mktemp("pool")
    good, broken = (str(save_tiny(tmp_path / f"deep-{i}", tiny_tokenizer, num_hidden_layers=6, seed=i)) for i in (0, 1))
    weights = Path(broken) / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])  # as an interrupted upload leaves it
    mapping = batch_mapping([good, broken], RECIPES, name="pool-batch")
    mapping["calibration"].update(samples=16, seq_len=128)
    mapping["evaluation"]["generation_tokens"] = 0
    batch = tmp_path / "batch.yaml"
    batch.write_text(yaml.safe_dump(mapping))
    shared = {
        "PREFECT_API_URL": postgres_stack["PREFECT_API_URL"],
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "SECATEUR_ARTIFACTS": str(tmp_path / "store"),
        "MLFLOW_TRACKING_URI": postgres_stack["MLFLOW_TRACKING_URI"],
        "SECATEUR_MIRROR_CHECKPOINTS": "true",
        "SECATEUR_HEARTBEAT_SECONDS": "1",
        "SECATEUR_STALE_AFTER_SECONDS": "5",
        "SECATEUR_POLL_SECONDS": "0.5",
        "PYTHONPATH": str(ROOT),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SECATEUR_", "MLFLOW_"))} | shared
    homes = [tmp_path / "worker-a", tmp_path / "worker-b"]
    workers = [_start_worker(home, env) for home in homes]
    batch_run = _secateur(["run", str(batch), "--pool", POOL], env, tmp_path / "batch-home", tmp_path)
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
        first = _summary(batch_run)
        assert killed is not None, f"no worker was caught in its second prune: {first[2]}"
        prepared = _prepare_runs(shared["PREFECT_API_URL"])
        record = json.loads(next((tmp_path / "batch-home" / "runs").glob("*.json")).read_text())
        weights.write_bytes(intact)
        workers[killed] = _start_worker(homes[killed], env)  # the lost machine is back
        third = tmp_path / "third-home"
        retry = _summary(_secateur(["retry", "pool-batch", "--pool", POOL], env, third, tmp_path))
        yield {
            "tmp": tmp_path,
            "env": env,
            "homes": homes,
            "killed": killed,
            "third": third,
            "batch": batch,
            "mapping": mapping,
            "models": (good, broken),
            "first": first,
            "prepared": prepared,
            "record": record,
            "retry": retry,
            "mlflow": shared["MLFLOW_TRACKING_URI"],
            "stack": postgres_stack["home"],
        }
    finally:
        for worker in workers:
            if worker.poll() is None:
                _kill_tree(worker)


def test_a_batch_fans_out_over_two_workers_and_survives_losing_one(pool_batch):
    """Pairs on both workers; the killed one's pair resumes elsewhere bit-identically; `retry` from a third state
    dir finishes the mended model's pairs on the pool."""
    from mlflow.tracking import MlflowClient

    run = pool_batch
    tmp_path, homes, killed, (good, broken) = run["tmp"], run["homes"], run["killed"], run["models"]
    code, summary, stderr = run["first"]
    assert code == 1 and "3 of 6 pairs failed" in stderr, stderr
    results = {(Path(r["model"]).name, r["status"]) for r in summary["results"]}
    assert results == {("deep-0", "completed"), ("deep-1", "failed")}, summary["results"]
    assert run["prepared"] == {good: 1, broken: 1}, "each model is prepared once, whatever its recipes"

    # Pairs ran on both workers; the one lost with its worker ran again and resumed from mirrored checkpoints.
    pairs = [p for p in run["record"]["results"] if p["status"] == "completed"]
    assert {p["worker"].split(":", 1)[1] for p in pairs} == {str(h.resolve()) for h in homes}
    rerun = [p for p in pairs if p["attempts"] == 2]
    assert len(rerun) == 1 and str(homes[1 - killed].resolve()) in rerun[0]["worker"], pairs
    client = MlflowClient(tracking_uri=run["mlflow"])
    assert client.get_run(rerun[0]["mlflow_run_id"]).data.metrics["resumed_from_block"] > 0
    assert not list((tmp_path / "store").glob("checkpoints/*/*")), "mirrored checkpoints are removed when done"
    assert not [h for h in homes if (h / "prefect-results").exists()], "task records are the pool's, in the store"
    assert list((tmp_path / "store" / "prefect-results").iterdir())

    # The mended model's pairs, retried from a machine that never saw the batch, ran on the pool.
    code, retried, stderr = run["retry"]
    assert code == 0, stderr
    assert {tuple(pair) for pair in retried["retried"]} == {(broken, r["name"]) for r in RECIPES}
    assert all(r["status"] == "completed" and Path(r["model"]).name == "deep-1" for r in retried["results"])
    assert not (run["third"] / "models").exists(), "the pairs ran on the pool's workers, not here"
    experiment = client.get_experiment_by_name("pool-batch")
    statuses = {r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert "RUNNING" not in statuses, statuses
    logs = [*tmp_path.glob("*.log"), *(run["stack"] / "stack").glob("*.log")]
    assert not [log for log in logs if "database is locked" in log.read_text(errors="replace")]

    # The resumed prune's weights equal those of an uninterrupted prune of the same pair.
    resumed_folder = next(
        p.parent
        for p in (homes[1 - killed] / "models").glob("*/*/*/sparsity.json")
        if json.loads(p.read_text())["resumed_from_block"] > 0
    )
    clean = _clean_prune(rerun[0], run["mapping"], tmp_path / "clean-home")
    resumed, reference = load_file(resumed_folder / "model.safetensors"), load_file(clean / "model.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(resumed[name].equal(reference[name]) for name in resumed)


def test_a_rerun_of_the_finished_batch_on_the_pool_computes_nothing(pool_batch):
    """The finished batch again, from the third machine: every stage of every pair is a cache hit."""
    run = pool_batch
    argv = ["run", str(run["batch"]), "--pool", POOL]
    code, _, stderr = _summary(_secateur(argv, run["env"], run["third"], run["tmp"]))
    assert code == 0, stderr
    states = {(Path(r["model"]).name, r["recipe_name"]): r["task_states"] for r in _full_run(run["third"])["results"]}
    cached = {"fetch": "Completed", "calibrate": "Cached", "evaluate_dense": "Cached", "prune": "Cached"}
    assert len(states) == 6 and all(s == cached | {"evaluate": "Cached"} for s in states.values()), states


def _full_run(home: Path) -> dict:
    """The run record of the whole batch (not the retry) in a state dir."""
    records = [json.loads(p.read_text()) for p in (home / "runs").glob("*.json")]
    return next(r for r in records if len(r["pairs"]) == 6)


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
