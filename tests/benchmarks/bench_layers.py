"""Benchmark (run on demand): APT's layer solve on one real block, judged on text it never saw.

    .venv/bin/python -m tests.benchmarks.bench_layers --model gemma3 --block 4      # 32 x 1024 C4 calibration
    .venv/bin/python -m tests.benchmarks.bench_layers --model smollm2 --block 3 --samples 64 --seq-len 512

For q_proj, o_proj, gate_proj and down_proj of the block (inputs from the dense model, C4 calibration) and
each target: the layer loss sum (x - w) H_u (x - w)^T on WikiText-2 windows (H_u: their own statistics) of
SparseGPT, of APT's first mask refit (CG, Jacobi and H^-1-preconditioned, with iterations and seconds), of
the ADMM-refined masks after 10/20/40 steps, and of the ridge toward the removal updates at fixed strengths.
Writes tests/benchmarks/results/layers-<timestamp>.json (losses relative to SparseGPT's).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import torch

from tests.benchmarks.common import WIKITEXT_TEST, write_results

MODULES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
RIDGES = (0.01, 0.03, 0.1, 0.3, 1.0)


def block_inputs(model, windows: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    """The dense inputs of the block's MODULES over `windows`."""
    from pruning_core.adapters import adapter_for
    from pruning_core.blocks import capture_block_inputs, run_block

    blocks = adapter_for(model).blocks(model)
    captured = capture_block_inputs(model, blocks, windows)
    hidden, seen = captured.hidden, {}
    with torch.no_grad():
        for index in range(block):
            hidden = torch.cat([run_block(blocks[index], h[None], captured.kwargs[index]) for h in hidden])
        handles = [
            blocks[block]
            .get_submodule(name)
            .register_forward_hook(lambda m, a, o, name=name: seen.setdefault(name, []).append(a[0].flatten(0, -2)))
            for name in MODULES
        ]
        for h in hidden:
            run_block(blocks[block], h[None], captured.kwargs[block])
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in seen.items()}


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def one_layer(name: str, weight: torch.Tensor, fit: torch.Tensor, unseen: torch.Tensor, target, seq_len: int) -> dict:
    from pruning_core.methods import METHODS, LayerProblem
    from pruning_core.methods.apt import conjugate_gradient_refit, select_mask
    from pruning_core.methods.refine import MaskRefinement, admm_mask, layer_loss
    from pruning_core.stats import damped

    stats = layer_statistics(fit, seq_len)
    unseen_hessian = 2 * unseen.T @ unseen / unseen.shape[0]
    problem = LayerProblem(name, weight, stats, target)
    sparsegpt, sparsegpt_seconds = timed(METHODS["sparsegpt"].prune, problem)
    base = layer_loss(weight, sparsegpt, unseen_hessian)
    row = {"layer": name, "target": target.describe(), "shape": list(weight.shape)}
    row |= {"sparsegpt_unseen": base, "sparsegpt_seconds": sparsegpt_seconds}
    inverse, damping = stats.inverse(problem.damping)
    (updated, mask), row["select_seconds"] = timed(select_mask, weight, inverse, problem, problem.block_size)
    system = damped(stats.hessian(), damping)
    for label, preconditioner in (("jacobi", None), ("inverse", inverse)):
        refit, seconds = timed(
            conjugate_gradient_refit, weight, system, mask, start=updated, preconditioner=preconditioner
        )
        row[f"cg_{label}"] = {
            "iterations": refit.iterations,
            "seconds": seconds,
            "unseen": layer_loss(weight, refit.weight, unseen_hessian) / base,
        }
    first = refit.weight
    scale = float(system.diagonal().mean())
    row["ridge"] = {
        str(strength): layer_loss(
            weight,
            conjugate_gradient_refit(
                weight, system, mask, start=updated, anchor=updated, ridge=strength * scale, preconditioner=inverse
            ).weight,
            unseen_hessian,
        )
        / base
        for strength in RIDGES
    }
    eigen, row["eigh_seconds"] = timed(stats.eigen, damping)
    for steps in (10, 20, 40):
        started = time.perf_counter()
        other, start = admm_mask(weight, eigen, first, mask, target, MaskRefinement(iterations=steps))
        second = conjugate_gradient_refit(weight, system, other, start=start, preconditioner=inverse).weight
        row[f"admm{steps}"] = {
            "seconds": time.perf_counter() - started,
            "moved": int((other & ~mask).sum()),
            "train_gain": 1 - layer_loss(weight, second, system) / layer_loss(weight, first, system),
            "unseen": layer_loss(weight, second, unseen_hessian) / base,
        }
    return row


def layer_statistics(inputs: torch.Tensor, seq_len: int):
    """A layer's input statistics (the Hessian) from its captured inputs, added window by window as in a prune."""
    from pruning_core.stats import StatisticsPlan

    stats = StatisticsPlan().start(inputs.shape[1], "cpu")
    for part in inputs.split(seq_len):
        stats.add_batch(part)
    return stats


def add_block_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick the model, its block, the calibration and the targets."""
    parser.add_argument("--model", choices=["smollm2", "gemma3"], default="gemma3")
    parser.add_argument("--model-path", default=None, help="a safetensors folder of the model (faster than its GGUF)")
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--targets", nargs="+", default=["0.5", "2:4", "0.7"])
    parser.add_argument("--out", default="/tmp/secateur-bench")


def calibrated_block(args: argparse.Namespace):
    """(model, tokenizer, the block's MODULES inputs over `--samples` x `--seq-len` C4 calibration windows)."""
    from infra.assets import smollm2_gguf, text_asset
    from pruning_core.data import calibration_windows, read_rows, tokenize_text
    from pruning_core.modeling import load_model
    from tests.benchmarks.bench_pruning import C4_CALIBRATION, gemma3_folder

    path = args.model_path or (str(gemma3_folder(args.out)) if args.model == "gemma3" else str(smollm2_gguf()))
    model, tokenizer = load_model(path)
    model.eval()
    calibration = tokenize_text(tokenizer, read_rows(str(text_asset(C4_CALIBRATION))))
    windows = calibration_windows(calibration, args.samples, args.seq_len, seed=0)
    return model, tokenizer, block_inputs(model, windows, args.block)


def layer_targets(model, args: argparse.Namespace) -> Iterator[tuple[str, torch.Tensor, object]]:
    """(module name, its float32 weight, target) for each of the block's MODULES and each of `--targets`."""
    from pruning_core.masks import SparsityTarget

    block = model.model.layers[args.block]
    for name in MODULES:
        weight = block.get_submodule(name).weight.detach().float()
        for text in args.targets:
            yield name, weight, SparsityTarget.parse_pattern(text) if ":" in text else SparsityTarget(ratio=float(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_block_arguments(parser)
    parser.add_argument("--unseen-samples", type=int, default=4)
    args = parser.parse_args()

    from pruning_core.data import calibration_windows, read_rows, tokenize_text
    from tests.benchmarks.bench_pruning import C4_CALIBRATION

    model, tokenizer, fit = calibrated_block(args)
    unseen_text = tokenize_text(tokenizer, read_rows(str(WIKITEXT_TEST)))
    unseen_windows = calibration_windows(unseen_text, args.unseen_samples, args.seq_len, seed=1)
    unseen = block_inputs(model, unseen_windows, args.block)
    rows = []
    for name, weight, target in layer_targets(model, args):
        row = one_layer(name, weight, fit[name], unseen[name], target, args.seq_len)
        rows.append(row)
        print(
            f"{name:<17} {row['target']:>4}  APT {row['cg_inverse']['unseen']:.3f}  "
            f"refined(20) {row['admm20']['unseen']:.3f}  x SparseGPT held out; CG iterations "
            f"{row['cg_jacobi']['iterations']} -> {row['cg_inverse']['iterations']}",
            flush=True,
        )
    header = {
        "model": args.model,
        "block": args.block,
        "calibration": f"{C4_CALIBRATION}, {args.samples} x {args.seq_len}",
        "unseen": f"WikiText-2 test, {args.unseen_samples} x {args.seq_len}",
        "losses": "held-out layer loss relative to SparseGPT's",
    }
    write_results("layers", header, rows)


if __name__ == "__main__":
    main()
