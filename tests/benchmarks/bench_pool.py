"""Benchmark (run on demand): one batch in one process vs on a Prefect work pool of 1 and 2 workers.

    .venv/bin/python -m tests.benchmarks.bench_pool
    .venv/bin/python -m tests.benchmarks.bench_pool --models 2 --recipes 3 --stale-after 20

A local Prefect server (`secateur stack up`), `secateur worker --slots N` processes with their own state
dirs, and the shared artifact store and MLflow (SQLite) in a scratch folder. Every mode runs the same batch
(tiny 8-layer Llamas x SparseGPT recipes) from a fresh set of state dirs, one torch thread per process
(`OMP_NUM_THREADS=1`), so 2 workers on 2 cores can at best halve the time. Measured: wall time of
`secateur run` per mode and the speedup over one worker; orchestration seconds per pair on one worker (its
wall time minus the compute the pairs and prepare runs report, over the number of pairs); and, in a last
run on 2 workers, the seconds from kill -9 of the worker that is pruning to the moment the lost pair runs
again on the other (it is declared lost after `--stale-after` seconds without a heartbeat).
Writes tests/benchmarks/results/pool-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psutil
import yaml

from tests.benchmarks.common import ROOT, write_results
from tests.conftest import batch_mapping, build_tiny_tokenizer, save_tiny

POOL = "bench"
METHODS = [
    {"method": "sparsegpt", "sparsity": 0.5},
    {"method": "sparsegpt", "pattern": "2:4"},
    {"method": "sparsegpt", "sparsity": 0.6},
    {"method": "wanda", "sparsity": 0.5},
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _models(folder: Path, count: int) -> list[str]:
    tokenizer = build_tiny_tokenizer()
    return [
        str(save_tiny(folder / f"llama8-{seed}", tokenizer, seed=seed, num_hidden_layers=8)) for seed in range(count)
    ]


class Cluster:
    """A scratch folder with a Prefect server, shared store and MLflow, and worker processes on demand."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SECATEUR_", "MLFLOW_"))}
        self.env = base | {
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "SECATEUR_ARTIFACTS": str(folder / "store"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
            "SECATEUR_PREFECT_PORT": str(_free_port()),
            "SECATEUR_MLFLOW_PORT": str(_free_port()),
        }
        self.stack_home = folder / "stack"
        self.secateur("stack", "up", home=self.stack_home)
        self.env["PREFECT_API_URL"] = f"http://127.0.0.1:{self.env['SECATEUR_PREFECT_PORT']}/api"
        self.workers: list[subprocess.Popen] = []

    def secateur(self, *argv: str, home: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        environment = {**self.env, **(env or {}), "SECATEUR_HOME": str(home)}
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", *argv], env=environment, cwd=self.folder, capture_output=True, text=True
        )
        if done.returncode:
            raise RuntimeError(f"secateur {' '.join(argv)}: {done.stderr.strip().splitlines()[-1:]}")
        return done

    def start_workers(self, count: int, tag: str, env: dict | None = None) -> list[Path]:
        homes = [self.folder / f"{tag}-worker-{n}" for n in range(count)]
        for home in homes:
            environment = {**self.env, **(env or {}), "SECATEUR_HOME": str(home)}
            log = open(self.folder / f"{home.name}.log", "wb")
            command = [sys.executable, "-m", "flows.cli", "worker", "--pool", POOL, "--slots", "1"]
            self.workers.append(subprocess.Popen(command, env=environment, cwd=self.folder, stdout=log, stderr=log))
        return homes

    def stop_workers(self) -> None:
        for worker in self.workers:
            kill_tree(worker.pid)
            worker.wait()
        self.workers = []

    def close(self) -> None:
        self.stop_workers()
        self.secateur("stack", "down", home=self.stack_home)


def kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for process in [*parent.children(recursive=True), parent]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def own_services(cluster: Cluster, mode: str) -> dict[str, str]:
    """A mode's own store and MLflow: results shared through the store would let a later mode compute nothing."""
    return {
        "SECATEUR_ARTIFACTS": str(cluster.folder / f"store-{mode}"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{cluster.folder / f'mlflow-{mode}.db'}",
    }


def run_batch(cluster: Cluster, batch: Path, home: Path, pool: bool, env: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    argv = ["run", str(batch), "--json"] + (["--pool", POOL] if pool else [])
    done = cluster.secateur(*argv, home=home, env=env)
    seconds = time.perf_counter() - started
    record = json.loads(next((home / "runs").glob("*.json")).read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1])["results"], "the batch gave no results"
    return seconds, record


PAIR_STAGES = ("prune", "recover", "evaluate", "publish")
MODEL_STAGES = ("fetch", "calibrate", "evaluate_dense")  # once per model (its prepare run); reused by its pairs


def compute_seconds(record: dict) -> float:
    """The stage work the batch needed: each pair's own stages, each model's shared stages once."""
    pairs = sum(r["stage_seconds"].get(stage, 0.0) for r in record["results"] for stage in PAIR_STAGES)
    first_of_model = {r["model"]: r for r in reversed(record["results"])}
    models = sum(r["stage_seconds"].get(stage, 0.0) for r in first_of_model.values() for stage in MODEL_STAGES)
    return pairs + models


def kill_and_recover(cluster: Cluster, batch: Path, stale_after: float) -> dict:
    """Two workers; kill the one pruning; seconds until the lost pair runs again elsewhere."""
    env = {"SECATEUR_STALE_AFTER_SECONDS": str(stale_after), "SECATEUR_HEARTBEAT_SECONDS": "2"}
    env |= own_services(cluster, "kill")
    homes = cluster.start_workers(2, "kill", env)
    home = cluster.folder / "kill-batch"
    run = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(batch), "--pool", POOL],
        env={**cluster.env, **env, "SECATEUR_HOME": str(home), "SECATEUR_POLL_SECONDS": "0.5"},
        cwd=cluster.folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_at = None
    while killed_at is None and run.poll() is None:
        for index, worker_home in enumerate(homes):
            if any(worker_home.glob("work/*/checkpoints/block-0002")):
                kill_tree(cluster.workers[index].pid)
                killed_at = time.time()
                break
        time.sleep(0.01)
    run.wait(timeout=1800)
    cluster.stop_workers()
    resubmitted, rerun = _second_attempt(cluster.folder, home, killed_at)
    return {
        "stale_after_seconds": stale_after,
        # From the logs: when the batch declared the pair lost and submitted it again, and when a worker began it.
        "kill_to_resubmit_seconds": None if resubmitted is None else resubmitted - killed_at,
        "kill_to_rerun_seconds": None if rerun is None else rerun - killed_at,
        "batch_exit": run.returncode,
    }


def _second_attempt(folder: Path, batch_home: Path, killed_at: float | None) -> tuple[float | None, float | None]:
    """(resubmitted, began) epoch seconds of the lost pair's second run, read from the batch's and workers' logs."""
    if killed_at is None:
        return None, None
    day = datetime.fromtimestamp(killed_at).date()
    resubmitted = began = None
    for line in "".join(p.read_text(errors="replace") for p in (batch_home / "logs").glob("*.log")).splitlines():
        if "running it again" in line and resubmitted is None:
            resubmitted = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    for log in folder.glob("kill-worker-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            # The worker has taken it: its flow-run process is starting.
            if "(attempt 2)' submitted to infrastructure" in line and began is None:
                clock = datetime.strptime(line[:12], "%H:%M:%S.%f").time()
                began = datetime.combine(day, clock).timestamp()
    return resubmitted, began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--recipes", type=int, default=3, choices=range(1, len(METHODS) + 1))
    parser.add_argument("--stale-after", type=float, default=20.0)
    parser.add_argument("--only-kill", action="store_true", help="only the kill -9 -> rerun measurement")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="secateur-pool-") as scratch:
        folder = Path(scratch)
        recipes = [{"name": f"r{n}", **method} for n, method in enumerate(METHODS[: args.recipes])]
        mapping = batch_mapping(_models(folder, args.models), recipes, name="bench-pool")
        mapping["calibration"].update(samples=32, seq_len=128)
        mapping["evaluation"]["generation_tokens"] = 0
        batch = folder / "batch.yaml"
        batch.write_text(yaml.safe_dump(mapping))
        pairs = args.models * args.recipes
        cluster = Cluster(folder)
        if args.only_kill:
            try:
                recovery = kill_and_recover(cluster, batch, args.stale_after)
            finally:
                cluster.close()
            print(json.dumps(recovery, indent=1))
            header = {"batch": f"{args.models} tiny 8-layer Llamas x {args.recipes} recipes"}
            write_results("pool-kill", header, [recovery])
            return
        try:
            seconds, record = run_batch(cluster, batch, folder / "in-process", False, own_services(cluster, "here"))
            rows.append({"mode": "in-process", "seconds": seconds, "pairs": pairs})
            print(f"in-process: {seconds:.1f} s", flush=True)
            for workers in (1, 2):
                services = own_services(cluster, f"pool{workers}")
                cluster.start_workers(workers, f"pool{workers}", services)
                seconds, record = run_batch(cluster, batch, folder / f"pool{workers}-batch", True, services)
                cluster.stop_workers()
                row = {"mode": f"{workers} worker(s)", "seconds": seconds, "pairs": pairs}
                if workers == 1:
                    row["pair_compute_seconds"] = compute_seconds(record)
                rows.append(row)
                print(f"{workers} worker(s): {seconds:.1f} s", flush=True)
            recovery = kill_and_recover(cluster, batch, args.stale_after)
            print(f"kill -> rerun: {recovery}", flush=True)
        finally:
            cluster.close()
    one, two = rows[1]["seconds"], rows[2]["seconds"]
    summary = {
        "speedup_2_workers_over_1": one / two,
        "speedup_2_workers_over_in_process": rows[0]["seconds"] / two,
        # Everything on one worker that is not a pair's own stage work (flow-run process start, scheduling,
        # polling, the prepare runs), per pair.
        "orchestration_seconds_per_pair": (one - rows[1]["pair_compute_seconds"]) / pairs,
        "recovery": recovery,
    }
    print(json.dumps(summary, indent=1))
    header = {
        "batch": f"{args.models} tiny 8-layer Llamas x {args.recipes} recipes, calibration 32 x 128",
        "threads_per_process": 1,
        **summary,
    }
    write_results("pool", header, rows)


if __name__ == "__main__":
    main()
