"""Benchmark (run on demand): block reconstruction's learning rate, judged on text the refit never saw.

    .venv/bin/python -m tests.benchmarks.bench_block_reconstruction --blocks 4 --methods sparsegpt wanda

The first `--blocks` decoder blocks of SmolLM2-135M are pruned (64 x 512 C4 calibration) with each method and
target, without block reconstruction and with it at each `--learning-rates` value. Judged by the relative error
of those blocks' output on WikiText-2 windows (||pruned - dense||^2 / ||dense - embeddings||^2: what the pruned
blocks lose of what the dense ones add) and by the calibration error the refit reports. Each run is its own
process (same seed, same calibration). Writes tests/benchmarks/results/block-reconstruction-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tests.benchmarks.bench_pruning import C4_CALIBRATION
from tests.benchmarks.common import WIKITEXT_TEST, run_child, write_results


def truncated(model, blocks: int):
    """`model` with only its first `blocks` decoder blocks (the rest are never run)."""
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:blocks]
    return model


@torch.no_grad()
def last_hidden(model, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first block's input, the last kept block's output) over every window."""
    seen: dict[str, list[torch.Tensor]] = {"in": [], "out": []}
    layers = model.model.layers
    first = layers[0].register_forward_pre_hook(lambda m, a: seen["in"].append(a[0]))
    last = layers[-1].register_forward_hook(lambda m, a, o: seen["out"].append(o[0] if isinstance(o, tuple) else o))
    for window in windows:
        model(window[None])
    first.remove()
    last.remove()
    return torch.cat(seen["in"]), torch.cat(seen["out"])


def one_run(args: argparse.Namespace) -> dict:
    from infra.assets import smollm2_gguf, text_asset
    from pruning_core.data import calibration_windows, read_rows, tokenize_text
    from pruning_core.engine import prune_model
    from pruning_core.job import calibration_set
    from pruning_core.modeling import load_model
    from pruning_core.recipe import Recipe

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model_path or str(smollm2_gguf()))
    model = truncated(model.eval(), args.blocks)
    unseen = calibration_windows(
        tokenize_text(tokenizer, read_rows(str(WIKITEXT_TEST))), args.unseen_samples, args.seq_len, seed=1
    )
    embedded, dense = last_hidden(model, unseen)
    target = {"pattern": args.target} if ":" in args.target else {"sparsity": float(args.target)}
    if args.learning_rate > 0:
        target["block_reconstruction"] = {"epochs": args.epochs, "learning_rate": args.learning_rate}
    recipe = Recipe(method=args.method, calibration_samples=args.samples, seq_len=args.seq_len, **target)
    calibration = calibration_set(tokenizer, read_rows(str(text_asset(C4_CALIBRATION))), recipe)
    started = time.perf_counter()
    summary = prune_model(model, calibration, recipe, progress=False)
    seconds = time.perf_counter() - started
    _, pruned = last_hidden(model, unseen)
    error = float((pruned - dense).square().sum() / (dense - embedded).square().sum())
    refits = summary.reconstruction.values()
    return {
        "prune_seconds": seconds,
        "reconstruct_seconds": summary.phase_seconds.get("reconstruct", 0.0),
        "unseen_error": error,
        "calibration_error_before": [r.error_before for r in refits],
        "calibration_error_after": [r.error_after for r in refits],
        "kept": [r.kept for r in refits],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=["sparsegpt", "wanda"])
    parser.add_argument("--targets", nargs="+", default=["0.5", "0.7"])
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[1e-5, 1e-4, 3e-4, 1e-3])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--unseen-samples", type=int, default=8)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "TARGET", "LR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.method, args.target, rate = args.child
        args.learning_rate = float(rate)
        print(json.dumps(one_run(args)))
        return
    rows = []
    for method in args.methods:
        for target in args.targets:
            for rate in [0.0, *args.learning_rates]:
                arguments = ["--child", method, target, str(rate), "--blocks", str(args.blocks)]
                arguments += ["--epochs", str(args.epochs), "--samples", str(args.samples)]
                arguments += ["--seq-len", str(args.seq_len), "--unseen-samples", str(args.unseen_samples)]
                arguments += ["--model-path", args.model_path] if args.model_path else []
                result = run_child(__spec__.name, arguments)
                rows.append({"method": method, "target": target, "learning_rate": rate, **result})
                print(
                    f"{method:<10} {target:>4} lr {rate:<7g} unseen error {result['unseen_error']:.4f}  "
                    f"prune {result['prune_seconds']:.1f} s (reconstruct {result['reconstruct_seconds']:.1f} s)",
                    flush=True,
                )
    header = {
        "model": f"SmolLM2-135M, first {args.blocks} blocks",
        "calibration": f"exllamav2 {C4_CALIBRATION}, {args.samples} x {args.seq_len}, seed 0",
        "unseen": f"WikiText-2 test, {args.unseen_samples} x {args.seq_len}, seed 1",
        "error": "||pruned - dense||^2 / ||dense - embeddings||^2 of the last kept block's output",
        "epochs": args.epochs,
    }
    write_results("block-reconstruction", header, rows)


if __name__ == "__main__":
    main()
