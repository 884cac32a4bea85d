"""Records the state dir that `tests/test_recorded_state.py` reruns (run once, with the code being preserved).

    .venv/bin/python -m tests.recorded.record_state

A tiny model and a batch of three recipes (Wanda 50%, SparseGPT 2:4, LLM-Pruner with LoRA recovery) run
with the pipeline of that commit; what its caches hold (Prefect's result records, calibration sets,
pruned and recovered folders, evaluations, file hashes) is kept under `tests/recorded/state/`, with the
model and the batch file. A later pipeline must find every stage of that batch cached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.conftest import batch_mapping, build_tiny_tokenizer, save_tiny

HERE = Path(__file__).resolve().parent
STATE = HERE / "state"
KEPT = ("prefect-results", "calibration", "models", "evaluations", "cache")
RECIPES = [
    {"name": "wanda50", "method": "wanda", "sparsity": 0.5},
    {"name": "sgpt24", "method": "sparsegpt", "pattern": "2:4"},
    {"name": "width", "method": "llm_pruner", "ratio": 0.2, "recovery": {"steps": 2, "seq_len": 32, "batch_size": 2}},
]


def batch_file(model: Path) -> dict:
    mapping = batch_mapping([str(model)], RECIPES, name="recorded")
    for recipe in mapping["recipes"]:
        if "recovery" in recipe:
            recipe["recovery"]["data"] = mapping["calibration"]["data"]
    return mapping


def main() -> None:
    shutil.rmtree(STATE, ignore_errors=True)
    model = save_tiny(STATE / "tiny-recorded", build_tiny_tokenizer(), seed=3)
    (STATE / "batch.json").write_text(json.dumps(batch_file(model), indent=1))
    with tempfile.TemporaryDirectory() as scratch:
        home = STATE / "home"
        env = {
            **os.environ,
            "SECATEUR_HOME": str(home),
            "SECATEUR_ARTIFACTS": f"{scratch}/store",
            "MLFLOW_TRACKING_URI": f"sqlite:///{scratch}/mlflow.db",
            "PREFECT_HOME": f"{scratch}/prefect",
        }
        command = [".venv/bin/python", "-m", "flows.cli", "run", str(STATE / "batch.json"), "--json"]
        subprocess.run(command, env=env, check=True)
        for entry in home.iterdir():
            if entry.name not in KEPT:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


if __name__ == "__main__":
    main()
