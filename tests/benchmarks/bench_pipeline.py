"""Benchmark (run on demand): pipeline overhead on the demo batch, and the cost of resuming after a crash.

    .venv/bin/python -m tests.benchmarks.bench_pipeline                    # both parts
    .venv/bin/python -m tests.benchmarks.bench_pipeline --skip-batch       # resume part only

Overhead = (batch wall time - time inside pruning and evaluation) / batch wall time, for the demo batch
(SmolLM2-135M x {wanda50, sparsegpt24, apt50}) in a fresh state dir; the wall time includes starting
Prefect's ephemeral API, MLflow logging and publishing to the filesystem store.
Resume: one prune of SmolLM2 (default SparseGPT 2:4) in a child process, three ways: uninterrupted,
killed with SIGKILL when the middle block's checkpoint lands, then the rerun that resumes.
Writes tests/benchmarks/results/pipeline-<timestamp>.json and prints the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
COMPUTE_STAGES = ("prune", "evaluate", "evaluate_dense")


def batch_overhead(home: Path) -> dict:
    os.environ["SECATEUR_HOME"] = str(home)
    from infra.settings import Settings, prepare_environment

    prepare_environment(Settings())
    from flows.batch import compress_batch
    from flows.demo import demo_batch

    started = time.perf_counter()
    results = compress_batch(demo_batch())
    wall = time.perf_counter() - started
    inside = sum(
        r.stage_seconds[stage] for r in results for stage in COMPUTE_STAGES if r.task_states[stage] == "Completed"
    )
    return {
        "wall_seconds": wall,
        "inside_prune_and_evaluate_seconds": inside,
        "overhead_fraction": (wall - inside) / wall,
        "pairs": [
            {
                "recipe": r.recipe_name,
                "stage_seconds": r.stage_seconds,
                "states": r.task_states,
                "perplexity": r.perplexity,
                "sparsity": r.sparsity,
            }
            for r in results
        ],
    }


def _worker(home: Path, method: str, target: str) -> subprocess.Popen:
    from infra.assets import smollm2_gguf, text_asset
    from pruning_core.recipe import Recipe

    goal = {"pattern": target} if ":" in target else {"sparsity": float(target)}
    recipe = Recipe(method=method, calibration_samples=32, seq_len=128, **goal)
    env = {**os.environ, "SECATEUR_HOME": str(home), "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "tests.workers.prune_worker",
        str(smollm2_gguf()),
        str(text_asset("c4.utf8")),
        recipe.model_dump_json(),
    ]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _finish(worker: subprocess.Popen) -> dict:
    out, _ = worker.communicate()
    if worker.returncode:
        raise RuntimeError(f"prune worker failed with exit status {worker.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def resume_cost(scratch: Path, method: str, target: str, blocks: int = 30) -> dict:
    started = time.perf_counter()
    _finish(_worker(scratch / "full", method, target))
    full = time.perf_counter() - started

    home = scratch / "crash"
    started = time.perf_counter()
    worker = _worker(home, method, target)
    middle = f"block-{blocks // 2 - 1:04d}"
    while not list(home.glob(f"work/*/checkpoints/{middle}")):
        if worker.poll() is not None:
            raise RuntimeError("the prune finished before the crash point")
        time.sleep(0.01)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    until_crash = time.perf_counter() - started
    started = time.perf_counter()
    resumed = _finish(_worker(home, method, target))
    resume = time.perf_counter() - started
    return {
        "method": method,
        "target": target,
        "calibration": "32 x 128 tokens of exllamav2 c4.utf8",
        "full_run_seconds": full,
        "killed_after_seconds": until_crash,
        "killed_after_block": blocks // 2 - 1,
        "resumed_from_block": resumed["resumed_from_block"],
        "resume_run_seconds": resume,
        "resume_vs_full": resume / full,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-batch", action="store_true", help="only measure the resume cost")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--target", default="2:4")
    args = parser.parse_args()
    result: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="secateur-bench-") as scratch:
        result["resume"] = resume_cost(Path(scratch), args.method, args.target)
        print(json.dumps(result["resume"], indent=2))
        if not args.skip_batch:
            result["batch"] = batch_overhead(Path(scratch) / "batch")
            print(json.dumps({k: v for k, v in result["batch"].items() if k != "pairs"}, indent=2))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
