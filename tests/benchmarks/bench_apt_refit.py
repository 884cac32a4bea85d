"""Benchmark (run on demand): APT's refit on real SmolLM2-135M layers, conjugate gradient vs the exact solve.

    .venv/bin/python -m tests.benchmarks.bench_apt_refit                 # blocks 3 and 20, 64 x 512 calibration
    .venv/bin/python -m tests.benchmarks.bench_apt_refit --blocks 10 --tolerances 1e-3

For every linear of the chosen blocks of the dense model and every target (50%, 2:4, 70%), APT selects its
mask once; then the exact per-row Cholesky refit and the conjugate-gradient refit at each tolerance re-solve
the kept weights. Reported per linear: seconds of mask selection and of each refit, CG iterations, and the
layer loss tr((W - Ŵ) H (W - Ŵ)^T) relative to the exact refit's (1.0 = as good as exact).
Writes tests/benchmarks/results/apt-refit-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from pruning_core.adapters import adapter_for
from pruning_core.blocks import capture_block_inputs
from pruning_core.engine import block_outputs, forward_budget, observe_groups, samples_per_forward
from pruning_core.masks import SparsityTarget
from pruning_core.methods import LayerProblem
from pruning_core.methods.apt import conjugate_gradient_refit, exact_refit, select_mask
from pruning_core.stats import damped, damped_inverse
from tests.benchmarks.common import SMOLLM2, write_results


def layer_loss(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = (dense - pruned).double()
    return float(((delta @ hessian.double()) * delta).sum())


def profile_linear(name: str, dense: torch.Tensor, stats, target: SparsityTarget, tolerances: list[float]) -> dict:
    hessian = stats.hessian()
    weight = dense.clone()
    weight[:, stats.dead_columns()] = 0
    problem = LayerProblem(name=name, weight=weight, stats=stats, target=target)
    started = time.perf_counter()
    inverse, damping = damped_inverse(hessian, problem.damping, name)
    updated, mask = select_mask(weight, inverse, problem, problem.block_size)
    select_seconds = time.perf_counter() - started
    system = damped(hessian, damping)
    started = time.perf_counter()
    exact = exact_refit(weight, system, mask)
    exact_seconds = time.perf_counter() - started
    exact_loss = layer_loss(dense, exact, hessian)
    row = {
        "layer": name,
        "shape": list(dense.shape),
        "target": target.describe(),
        "select_seconds": select_seconds,
        "exact_seconds": exact_seconds,
        "warm_start_loss_ratio": layer_loss(dense, updated, hessian) / exact_loss,
        "cg": [],
    }
    for tolerance in tolerances:
        started = time.perf_counter()
        refit = conjugate_gradient_refit(weight, system, mask, start=updated, tolerance=tolerance, max_iterations=200)
        seconds = time.perf_counter() - started
        row["cg"].append(
            {
                "tolerance": tolerance,
                "iterations": refit.iterations,
                "seconds": seconds,
                "loss_ratio": layer_loss(dense, refit.weight, hessian) / exact_loss,
                "weight_difference": float((refit.weight - exact).norm() / exact.norm()),
                "mask_kept": bool(torch.equal(refit.weight == 0, exact == 0)),
            }
        )
    return row


def parse_target(text: str) -> SparsityTarget:
    return SparsityTarget.parse_pattern(text) if ":" in text else SparsityTarget(ratio=float(text))


def print_row(row: dict) -> None:
    cg = " ".join(
        f"tol {c['tolerance']:.0e}: {c['iterations']:>3} it {c['seconds']:.2f}s x{c['loss_ratio']:.5f}"
        for c in row["cg"]
    )
    print(
        f"{row['layer']:<32} {row['target']:>4} select {row['select_seconds']:.2f}s exact {row['exact_seconds']:.2f}s "
        f"warm x{row['warm_start_loss_ratio']:.3f} | {cg}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[3, 20])
    parser.add_argument("--targets", nargs="+", default=["0.5", "2:4", "0.7"])
    parser.add_argument("--tolerances", type=float, nargs="+", default=[1e-2, 3e-3, 1e-3, 3e-4, 1e-4])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    from infra.assets import smollm2_gguf, text_asset
    from pruning_core.data import calibration_windows, read_rows, tokenize_text
    from pruning_core.modeling import load_model

    model, tokenizer = load_model(str(smollm2_gguf()))
    ids = calibration_windows(
        tokenize_text(tokenizer, read_rows(str(text_asset("c4.utf8")))), args.samples, args.seq_len, seed=0
    )
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    captured = capture_block_inputs(model, blocks, ids)
    inputs = captured.hidden
    rows = []
    for index in range(max(args.blocks) + 1):
        block = blocks[index]
        batch = samples_per_forward(block, inputs, forward_budget("cpu", None))
        kwargs = captured.kwargs[index]
        if index in args.blocks:
            groups = adapter.groups(block, inputs, kwargs)
            observers = observe_groups(adapter, block, groups, inputs, kwargs, device="cpu", batch=batch)
            for group, observer in zip(groups, observers, strict=True):
                for linear in group.linears:
                    dense = block.get_submodule(linear).weight.detach().float()
                    for text in args.targets:
                        name = f"{adapter.block_prefix(index)}.{linear}"
                        rows.append(profile_linear(name, dense, observer.stats, parse_target(text), args.tolerances))
                        print_row(rows[-1])
        inputs = block_outputs(block, inputs, kwargs, "", False, batch)

    write_results(
        "apt-refit",
        {"model": SMOLLM2, "calibration": f"exllamav2 c4.utf8, {args.samples} x {args.seq_len} tokens, seed 0"},
        rows,
    )


if __name__ == "__main__":
    main()
