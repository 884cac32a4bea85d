"""Benchmark (run on demand): where APT's prune time goes, per part, on one real block's layers.

    .venv/bin/python -m tests.benchmarks.bench_apt_time --model gemma3 --block 4       # 32 x 1024 C4 calibration
    .venv/bin/python -m tests.benchmarks.bench_apt_time --model smollm2 --block 3 --samples 64 --seq-len 512

For q_proj, o_proj, gate_proj and down_proj of the block (their dense inputs on the C4 calibration) and each
target: SparseGPT's and APT's (default recipe: ADMM refinement on) wall time for the layer, APT's time in each
part (mask selection, H^-1, eigendecomposition, ADMM, CG refits with their tolerances and iterations) and the
layer loss (x - w) H (x - w)^T on the calibration. Writes tests/benchmarks/results/apt-time-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable

from tests.benchmarks.bench_layers import add_block_arguments, calibrated_block, layer_statistics, layer_targets
from tests.benchmarks.common import write_results


def _timing(table: dict[str, float], key: str, function: Callable) -> Callable:
    def timed(*args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        table[key] += time.perf_counter() - started
        return result

    return timed


def one_layer(name: str, weight, fit, target, seq_len: int) -> dict:
    import pruning_core.methods.apt as apt
    import pruning_core.stats as stats_module
    from pruning_core.methods import METHODS, LayerProblem
    from pruning_core.methods.apt import AptSettings
    from pruning_core.methods.refine import layer_loss
    from pruning_core.stats import damped

    def problem() -> LayerProblem:
        return LayerProblem(name, weight, layer_statistics(fit, seq_len), target, settings=AptSettings())

    parts: dict[str, float] = defaultdict(float)
    refits: list[dict] = []
    plain_cg = apt.conjugate_gradient_refit

    def logged_cg(*args, **kwargs):
        started = time.perf_counter()
        refit = plain_cg(*args, **kwargs)
        seconds = time.perf_counter() - started
        parts["cg_refits"] += seconds
        tolerance = kwargs.get("tolerance", apt.CG_TOLERANCE)
        refits.append({"tolerance": tolerance, "iterations": refit.iterations, "seconds": seconds})
        return refit

    patched = {
        (apt, "select_mask"): _timing(parts, "select_mask", apt.select_mask),
        (apt, "admm_mask"): _timing(parts, "admm", apt.admm_mask),
        (apt, "conjugate_gradient_refit"): logged_cg,
        (stats_module.InputStatistics, "inverse"): _timing(parts, "inverse", stats_module.InputStatistics.inverse),
        (stats_module.InputStatistics, "eigen"): _timing(parts, "eigen", stats_module.InputStatistics.eigen),
    }
    originals = {key: getattr(*key) for key in patched}
    sparsegpt_problem = problem()
    started = time.perf_counter()
    METHODS["sparsegpt"].prune(sparsegpt_problem)
    sparsegpt_seconds = time.perf_counter() - started
    apt_problem = problem()
    try:
        for (owner, attribute), replacement in patched.items():
            setattr(owner, attribute, replacement)
        started = time.perf_counter()
        pruned = METHODS["apt"].prune(apt_problem)
        apt_seconds = time.perf_counter() - started
    finally:
        for (owner, attribute), original in originals.items():
            setattr(owner, attribute, original)
    hessian = damped(apt_problem.stats.hessian(), 0.0)
    return {
        "layer": name,
        "target": target.describe(),
        "shape": list(weight.shape),
        "sparsegpt_seconds": sparsegpt_seconds,
        "apt_seconds": apt_seconds,
        "apt_parts": dict(parts),
        "cg_refits": refits,
        "apt_loss": layer_loss(weight, pruned, hessian),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_block_arguments(parser)
    args = parser.parse_args()

    from tests.benchmarks.bench_pruning import C4_CALIBRATION

    model, _, fit = calibrated_block(args)
    rows = []
    for name, weight, target in layer_targets(model, args):
        row = one_layer(name, weight, fit[name], target, args.seq_len)
        rows.append(row)
        parts = ", ".join(f"{key} {value:.2f}" for key, value in row["apt_parts"].items())
        print(
            f"{name:<17} {row['target']:>4}  SparseGPT {row['sparsegpt_seconds']:.2f} s  APT "
            f"{row['apt_seconds']:.2f} s ({parts}); loss {row['apt_loss']:.6g}",
            flush=True,
        )
    total = {
        "sparsegpt_seconds": sum(row["sparsegpt_seconds"] for row in rows),
        "apt_seconds": sum(row["apt_seconds"] for row in rows),
    }
    print(total)
    header = {
        "model": args.model,
        "block": args.block,
        "calibration": f"{C4_CALIBRATION}, {args.samples} x {args.seq_len}",
        "total": total,
    }
    write_results("apt-time", header, rows)


if __name__ == "__main__":
    main()
