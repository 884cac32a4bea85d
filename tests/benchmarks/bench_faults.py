"""Benchmark (run on demand): kill -9 a tiny batch at a random point, run it again, check what is left.

    .venv/bin/python -m tests.benchmarks.bench_faults --runs 8
    .venv/bin/python -m tests.benchmarks.bench_faults --runs 2 --points prune

A tiny Llama (saved with a tokenizer trained on WikiText) and a batch of two recipes (SparseGPT 50%, APT 2:4)
run once cleanly. Then, per run, the same batch starts in a fresh state dir and is killed with SIGKILL (only
the `secateur` process: its Prefect server must go by itself) once the chosen stage has started (prune,
evaluate, publish, or a random moment inside the prune's block checkpoints), and is run again to the end.
Counted: reruns that completed, pruned weights bit-identical to the clean run's, processes left running,
temp files left in the state dir. Also a table of bad inputs for every CLI command: exit code, stderr lines.
Writes tests/benchmarks/results/faults-<timestamp>.json.

    .venv/bin/python -m tests.benchmarks.bench_faults --services

Service faults instead, each in a fresh state dir against real services (a `prefect server`, a moto S3
server, an MLflow server reached with a password in its URI, sockets that accept and never answer): the
Prefect server killed mid-prune, S3 killed at publish and restarted, MLflow killed mid-prune, hung S3 and
MLflow endpoints, a pruned folder corrupted on disk. Counted: faults injected, batches that ended within
their stated bound, reruns completed, published artifacts whose bytes match their MLflow record, secrets
found in any output or state-dir file. Writes tests/benchmarks/results/service-faults-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.benchmarks.common import ROOT, write_results
from tests.conftest import WIKITEXT_TEST, WIKITEXT_VALID, batch_mapping, build_tiny_tokenizer, tiny_model
from tests.services import wait_for_log

RECIPES = [
    {"name": "sparsegpt50", "method": "sparsegpt", "sparsity": 0.5},
    {"name": "apt24", "method": "apt", "pattern": "2:4"},
]
# The log line of the stage (the batch flow logs each stage's start) after which the kill comes.
MARKERS = {
    "prune": "stage prune started",
    "evaluate": "stage evaluate started",
    "publish": "stage publish started",
    "checkpoint": "stage prune started",  # plus a random delay inside the block loop
}


def environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SECATEUR_", "MLFLOW_"))}
    return {**env, "PYTHONPATH": str(ROOT), "SECATEUR_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def secateur(*argv: str, home: Path, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "flows.cli", *argv]
    return subprocess.Popen(command, cwd=home.parent, env=environment(home), text=True, **popen)


def weights(home: Path) -> dict[str, str]:
    """sha256 of every pruned model file, keyed by its path under models/."""
    return {
        str(path.relative_to(home / "models")): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((home / "models").rglob("*.safetensors"))
    }


def server_processes(home: Path) -> list[int]:
    """Processes whose environment names this state dir (the CLI and its Prefect server)."""
    found = []
    marker = f"SECATEUR_HOME={home}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def one_fault(batch: Path, home: Path, point: str, rng: random.Random, clean: dict[str, str]) -> dict:
    process = secateur("run", str(batch), home=home, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    reached = wait_for_log(process, MARKERS[point], timeout=600)
    if point == "checkpoint":
        time.sleep(rng.uniform(0.0, 1.5))
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(2)  # the kernel's parent-death signal reaches the server
    left_after_kill = server_processes(home)
    rerun = secateur("run", str(batch), home=home, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, stderr = rerun.communicate(timeout=1200)
    time.sleep(1)
    temp_files = [str(p.relative_to(home)) for p in home.rglob("*") if ".tmp" in p.name]
    return {
        "point": point,
        "stage_reached": reached,
        "killed": killed,
        "processes_left_after_kill": len(left_after_kill),
        "rerun_exit": rerun.returncode,
        "rerun_error": stderr.strip().splitlines()[-1] if rerun.returncode and stderr.strip() else None,
        "bit_identical": weights(home) == clean,
        "processes_left_after_rerun": len(server_processes(home)),
        "temp_files_left": temp_files,
    }


BAD_INPUTS = [
    ["run", "{tmp}/no-such-batch.yaml"],
    ["run", "{tmp}/broken.yaml"],
    ["retry", "no-such-run"],
    ["report", "no-such-batch"],
    [
        "prune",
        "/no/such/model",
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calibration",
        "{wiki}",
        "--out",
        "{tmp}/o",
    ],
    ["prune", "{model}", "--method", "wanda", "--sparsity", "1.5", "--calibration", "{wiki}", "--out", "{tmp}/o"],
    [
        "prune",
        "{model}",
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calibration",
        "{tmp}/binary.txt",
        "--out",
        "{tmp}/o",
    ],
    ["prune", "{model}", "--method", "wanda", "--sparsity", "0.5", "--calibration", "{wiki}", "--out", "{tmp}/taken"],
    ["evaluate", "{model}", "--perplexity", "{wiki}", "--seq-len", "0"],
    ["evaluate", "{model}", "--perplexity", "{wiki}", "--seq-len", "100000"],
    ["evaluate", "{tmp}/broken-model", "--perplexity", "{wiki}"],
    ["deploy", "{tmp}/no-such-batch.yaml", "--pool", "gpu"],
]


def tiny_batch(folder: Path, recipes: list[dict]) -> tuple[Path, Path]:
    """A tiny Llama with a trained tokenizer under `folder`, and a batch file of it x `recipes`."""
    model = folder / "tiny-llama"
    tiny_model("llama").save_pretrained(model)
    build_tiny_tokenizer().save_pretrained(model)
    batch = folder / "batch.yaml"
    mapping = batch_mapping([str(model)], recipes, name="faults")
    mapping["calibration"].update(data=str(WIKITEXT_VALID), samples=16, seq_len=128)
    mapping["evaluation"]["perplexity"] = [str(WIKITEXT_TEST)]
    batch.write_text(yaml.safe_dump(mapping))
    return model, batch


def bad_input_table(model: Path, folder: Path, home: Path) -> list[dict]:
    home.parent.mkdir(parents=True, exist_ok=True)
    (folder / "broken.yaml").write_text("name: b\nmodels: [a\n")
    (folder / "binary.txt").write_bytes(b"\xff\xfe\x00" * 100)
    (folder / "taken").mkdir(exist_ok=True)
    (folder / "taken" / "keep.txt").write_text("mine")
    broken = folder / "broken-model"
    broken.mkdir(exist_ok=True)
    for item in model.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "config.json").write_text("{")
    rows = []
    for argv in BAD_INPUTS:
        filled = [a.format(tmp=folder, wiki=WIKITEXT_VALID, model=model) for a in argv]
        done = secateur(*filled, home=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _stdout, stderr = done.communicate(timeout=300)
        lines = [line for line in stderr.strip().splitlines() if line]
        rows.append(
            {
                "input": " ".join(argv),
                "exit": done.returncode,
                "stderr_lines": len(lines),
                "message": lines[-1] if lines else "",
            }
        )
        print(
            f"{done.returncode:>3}  {len(lines)} line(s)  {' '.join(argv)[:70]:<70} {rows[-1]['message'][:100]}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--points", nargs="+", default=list(MARKERS), choices=list(MARKERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--services", action="store_true", help="service faults (see the module's help)")
    args = parser.parse_args()
    if args.services:
        from tests.benchmarks.service_faults import run_service_faults

        run_service_faults()
        return
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="secateur-faults-") as scratch:
        folder = Path(scratch)
        model, batch = tiny_batch(folder, RECIPES)
        clean_home = folder / "clean" / "home"
        clean_home.parent.mkdir()
        started = time.perf_counter()
        clean_run = secateur("run", str(batch), home=clean_home, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, stderr = clean_run.communicate(timeout=1200)
        if clean_run.returncode:
            raise SystemExit(f"the clean run failed: {stderr.strip().splitlines()[-1:]}")
        clean = weights(clean_home)
        print(f"clean run: {time.perf_counter() - started:.0f} s, {len(clean)} pruned files", flush=True)
        runs = []
        for number in range(args.runs):
            point = args.points[number % len(args.points)]
            home = folder / f"run-{number}" / "home"
            home.parent.mkdir()
            runs.append(one_fault(batch, home, point, rng, clean))
            print(runs[-1], flush=True)
        table = bad_input_table(model, folder, folder / "bad" / "home")
    counts = {
        "runs": len(runs),
        "killed": sum(r["killed"] for r in runs),
        "reruns_completed": sum(r["rerun_exit"] == 0 for r in runs),
        "bit_identical": sum(r["bit_identical"] for r in runs),
        "processes_left_after_kill": sum(r["processes_left_after_kill"] for r in runs),
        "processes_left_after_rerun": sum(r["processes_left_after_rerun"] for r in runs),
        "temp_files_left": sum(len(r["temp_files_left"]) for r in runs),
        "bad_inputs": len(table),
        "bad_inputs_one_line_nonzero": sum(r["exit"] != 0 and r["stderr_lines"] == 1 for r in table),
    }
    print(counts)
    write_results("faults", {"counts": counts, "bad_inputs": table, "recipes": RECIPES}, runs)


if __name__ == "__main__":
    main()
