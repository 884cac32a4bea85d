"""Benchmark (run on demand): one batch in one process vs on a Prefect work pool of 1 and 2 workers.

    .venv/bin/python -m tests.benchmarks.bench_pool
    .venv/bin/python -m tests.benchmarks.bench_pool --models 2 --recipes 3 --stale-after 20

The production stack on this machine (`secateur stack up --postgres`: PostgreSQL, a Prefect server and an MLflow
server on it), `secateur worker --slots N` processes (warm, or `--fresh-process` to compare) with their own state
dirs, and the shared artifact store in a scratch folder. Every mode runs the same batch
(tiny 8-layer Llamas x SparseGPT recipes) from a fresh set of state dirs, one torch thread per process
(`OMP_NUM_THREADS=1`), so 2 workers on 2 cores can at best halve the time. Measured: wall time of
`secateur run` per mode and the speedup over one worker; orchestration seconds per pair on one worker (its
wall time minus the compute the pairs and prepare runs report, over the number of pairs); and, in a last
run on 2 workers, the seconds from kill -9 of the worker that is pruning to the moment the lost pair runs
again on the other (it is declared lost after `--stale-after` seconds without a heartbeat); with `--load-pairs N`,
N pairs on 2 workers, counting "database is locked" and heartbeat failures in every log.
Writes tests/benchmarks/results/pool-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
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
from tests.services import free_port

POOL = "bench"
METHODS = [
    {"method": "sparsegpt", "sparsity": 0.5},
    {"method": "sparsegpt", "pattern": "2:4"},
    {"method": "sparsegpt", "sparsity": 0.6},
    {"method": "wanda", "sparsity": 0.5},
]


def _models(folder: Path, count: int) -> list[str]:
    tokenizer = build_tiny_tokenizer()
    return [
        str(save_tiny(folder / f"llama8-{seed}", tokenizer, seed=seed, num_hidden_layers=8)) for seed in range(count)
    ]


class Cluster:
    """A scratch folder with the PostgreSQL-backed stack and a shared store, and worker processes on demand."""

    def __init__(self, folder: Path, fresh_process: bool = False) -> None:
        self.folder = folder
        self.fresh_process = fresh_process
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SECATEUR_", "MLFLOW_"))}
        self.env = base | {
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "SECATEUR_ARTIFACTS": str(folder / "store"),
            "SECATEUR_PREFECT_PORT": str(free_port()),
            "SECATEUR_MLFLOW_PORT": str(free_port()),
            "SECATEUR_POSTGRES_PORT": str(free_port()),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        self.stack_home = folder / "stack"
        up = self.secateur("stack", "up", "--postgres", "--json", home=self.stack_home)
        # Clients as in production: the Prefect API and the MLflow server (on PostgreSQL), never a database file.
        self.env |= json.loads(up.stdout.strip().splitlines()[-1])["env"]
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
            command += ["--fresh-process"] if self.fresh_process else []
            self.workers.append(subprocess.Popen(command, env=environment, cwd=self.folder, stdout=log, stderr=log))
        self._wait_ready(homes)
        return homes

    def _wait_ready(self, homes: list[Path], timeout: float = 120) -> None:
        """Until every worker polls the pool: a production pool is up before a batch comes, so its start (imports)
        is not the batch's time."""
        deadline = time.monotonic() + timeout
        for home in homes:
            log = self.folder / f"{home.name}.log"
            while "started!" not in log.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {home.name} did not start: see {log}")
                time.sleep(0.2)

    def stop_workers(self) -> None:
        for worker in self.workers:
            kill_tree(worker.pid)
            worker.wait()
        self.workers = []

    def close(self) -> None:
        self.stop_workers()
        self.secateur("stack", "down", "--purge", home=self.stack_home)


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
    """A mode's own store: results shared through the store would let a later mode compute nothing."""
    return {"SECATEUR_ARTIFACTS": str(cluster.folder / f"store-{mode}")}


def run_batch(cluster: Cluster, batch: Path, home: Path, pool: bool, env: dict) -> tuple[float, dict]:
    argv = ["run", str(batch), "--json"] + (["--pool", POOL] if pool else [])
    psutil.cpu_percent()  # from here
    started = time.perf_counter()
    done = cluster.secateur(*argv, home=home, env=env)
    seconds = time.perf_counter() - started
    record = json.loads(next((home / "runs").glob("*.json")).read_text())
    # How busy the machine's cores were over the batch (all processes: workers, batch, servers, PostgreSQL).
    record["cpu_busy_percent"] = psutil.cpu_percent()
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


def pool_seconds(logs) -> float:
    """From the workers' logs: the first flow run taken to the last one finished."""
    clocks = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if "submitted to infrastructure" in line or ("Flow run '" in line and "Finished in state" in line):
                clocks.append(datetime.strptime(line[:12], "%H:%M:%S.%f"))
    return (max(clocks) - min(clocks)).total_seconds()


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


PROBLEMS = {
    "database_locked": "database is locked",
    "heartbeat_not_written": "heartbeat not written",
    "pair_declared_lost": "running it again",
}


def load(cluster: Cluster, models: list[str], pairs: int) -> dict:
    """`pairs` pairs on 2 workers against the PostgreSQL-backed servers: every pair completes, and no log of the
    batch, the workers or the servers holds a locked database, a failed heartbeat or a pair declared lost."""
    per_model = pairs // len(models)
    methods = ["sparsegpt", "wanda", "magnitude"]
    recipes = [
        {"name": f"l{n:02d}", "method": methods[n % 3], "sparsity": round(0.3 + 0.01 * n, 2)} for n in range(per_model)
    ]
    batch = _batch_file(cluster.folder / "load.yaml", models, recipes)
    services = own_services(cluster, "load")
    cluster.start_workers(2, "load", services)
    seconds, record = run_batch(cluster, batch, cluster.folder / "load-batch", True, services)
    cluster.stop_workers()
    logs = [*cluster.folder.glob("load-*.log"), *(cluster.folder / "load-batch" / "logs").glob("*.log")]
    logs += list((cluster.stack_home / "stack").glob("*.log"))
    text = "\n".join(path.read_text(errors="replace") for path in logs)
    completed = sum(result["status"] == "completed" for result in record["results"])
    counts = {name: text.count(needle) for name, needle in PROBLEMS.items()}
    return {"pairs": len(models) * per_model, "completed": completed, "seconds": seconds, **counts}


def _batch_file(path: Path, models: list[str], recipes: list[dict]) -> Path:
    mapping = batch_mapping(models, recipes, name=f"bench-{path.stem}")
    mapping["calibration"].update(samples=32, seq_len=128)
    mapping["evaluation"]["generation_tokens"] = 0
    path.write_text(yaml.safe_dump(mapping))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--recipes", type=int, default=4, choices=range(1, len(METHODS) + 1))
    parser.add_argument("--stale-after", type=float, default=20.0)
    parser.add_argument("--fresh-process", action="store_true", help="workers start a process per pair (before)")
    parser.add_argument("--load-pairs", type=int, default=40, help="pairs of the load run on 2 workers (0: none)")
    parser.add_argument("--only", choices=["kill", "load"], help="only the kill -9 -> rerun or the load measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="secateur-pool-") as scratch:
        folder = Path(scratch)
        models = _models(folder, args.models)
        recipes = [{"name": f"r{n}", **method} for n, method in enumerate(METHODS[: args.recipes])]
        batch = _batch_file(folder / "batch.yaml", models, recipes)
        cluster = Cluster(folder, fresh_process=args.fresh_process)
        try:
            summary = _measure(cluster, args, batch, models)
        finally:
            cluster.close()
    print(json.dumps(summary, indent=1))
    header = {
        "batch": f"{args.models} tiny 8-layer Llamas x {args.recipes} recipes, calibration 32 x 128",
        "stack": "PostgreSQL 15 + Prefect server + MLflow server (secateur stack up --postgres)",
        "workers": "fresh process per pair" if args.fresh_process else "warm",
        "threads_per_process": 1,
        **{key: value for key, value in summary.items() if key != "runs"},
    }
    write_results("pool", header, summary.get("runs", []))


def _measure(cluster: Cluster, args: argparse.Namespace, batch: Path, models: list[str]) -> dict:
    if args.only == "kill":
        return {"recovery": kill_and_recover(cluster, batch, args.stale_after)}
    if args.only == "load":
        return {"load": load(cluster, models, args.load_pairs)}
    pairs = args.models * args.recipes
    seconds, _ = run_batch(cluster, batch, cluster.folder / "in-process", False, own_services(cluster, "here"))
    rows = [{"mode": "in-process", "seconds": seconds, "pairs": pairs}]
    print(f"in-process: {seconds:.1f} s", flush=True)
    for workers in (1, 2):
        services = own_services(cluster, f"pool{workers}")
        cluster.start_workers(workers, f"pool{workers}", services)
        seconds, record = run_batch(cluster, batch, cluster.folder / f"pool{workers}-batch", True, services)
        cluster.stop_workers()
        row = {"mode": f"{workers} worker(s)", "seconds": seconds, "pairs": pairs}
        row["cpu_busy_percent"] = record["cpu_busy_percent"]
        row["pool_seconds"] = pool_seconds(cluster.folder.glob(f"pool{workers}-worker-*.log"))
        if workers == 1:
            row["pair_compute_seconds"] = compute_seconds(record)
        rows.append(row)
        print(f"{workers} worker(s): {seconds:.1f} s", flush=True)
    recovery = kill_and_recover(cluster, batch, args.stale_after)
    print(f"kill -> rerun: {recovery}", flush=True)
    one, two = rows[1]["seconds"], rows[2]["seconds"]
    summary = {
        "speedup_2_workers_over_1": one / two,
        # The part workers share: first flow run taken to last one finished (the batch's own start and end, in
        # the submitting process, are the same for any number of workers).
        "pool_speedup_2_workers_over_1": rows[1]["pool_seconds"] / rows[2]["pool_seconds"],
        "speedup_2_workers_over_in_process": rows[0]["seconds"] / two,
        # Everything on one worker that is not a pair's own stage work (the batch's own start and end, scheduling,
        # polling, flow-run start, the prepare runs), per pair.
        "orchestration_seconds_per_pair": (one - rows[1]["pair_compute_seconds"]) / pairs,
        "recovery": recovery,
        "runs": rows,
    }
    if args.load_pairs:
        summary["load"] = load(cluster, models, args.load_pairs)
        print(f"load: {summary['load']}", flush=True)
    return summary


if __name__ == "__main__":
    main()
