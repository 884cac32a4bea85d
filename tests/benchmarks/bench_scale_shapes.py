"""Benchmark (run on demand): seconds per block of Wanda, SparseGPT and APT at LLaMA-2-7B and 70B block shapes.

    python -m tests.benchmarks.bench_scale_shapes --device cuda                       # 7b and 70b, 128 x 2048
    python -m tests.benchmarks.bench_scale_shapes --device cuda --shapes 70b --check-resume
    python -m tests.benchmarks.bench_scale_shapes --shapes 7b-quarter --samples 8 --seq-len 512   # a CPU-sized run

A random-initialised Llama with the shape's blocks (a few of them: --blocks), bf16 weights, random token
calibration, pruned at 50% by each method in its own process. Reported per method: seconds per block split
into statistics (hooked forwards and Hessian accumulation), solve (the method itself) and forward (the pruned
block's outputs), the solve seconds of each linear of one block, peak GPU and host memory, and the projected
full-model time: per block x the model's block count + the embedding pass. `--check-resume` also prunes the
last block again from the checkpointed inputs and checks that the weights are bit-identical.
Writes tests/benchmarks/results/scale-shapes-<timestamp>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import signal
import sys
import time
from pathlib import Path

import torch

from tests.benchmarks.common import RESULTS, run_child, write_results

# LLaMA-2 block shapes; "7b-quarter" keeps 7B's proportions at a quarter of its width, for CPU runs.
SHAPES: dict[str, dict] = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "heads": 32, "kv_heads": 32, "model_blocks": 32},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "heads": 64, "kv_heads": 8, "model_blocks": 80},
    "7b-quarter": {"hidden_size": 1024, "intermediate_size": 2752, "heads": 8, "kv_heads": 8, "model_blocks": 32},
}


def shaped_model(shape: str, blocks: int, seq_len: int, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    fields = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=fields["hidden_size"],
        intermediate_size=fields["intermediate_size"],
        num_attention_heads=fields["heads"],
        num_key_value_heads=fields["kv_heads"],
        num_hidden_layers=blocks,
        max_position_embeddings=max(seq_len, 4096),
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def time_apt_steps(device: str) -> dict:
    """Wrap APT's two steps (mask selection, refit) with timers; returns the running totals it fills."""
    from pruning_core.methods import apt

    totals = {"select_seconds": 0.0, "refit_seconds": 0.0, "refit_iterations": []}

    def timed(function, key: str):
        def run(*args, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            result = function(*args, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            totals[key] += time.perf_counter() - started
            if key == "refit_seconds":
                totals["refit_iterations"].append(result.iterations)
            return result

        return run

    apt.select_mask = timed(apt.select_mask, "select_seconds")
    apt.conjugate_gradient_refit = timed(apt.conjugate_gradient_refit, "refit_seconds")
    return totals


def one_run(args: argparse.Namespace) -> dict:
    from pruning_core.engine import BlockResult, prune_model
    from pruning_core.recipe import Recipe

    apt_steps = time_apt_steps(args.device) if args.method == "apt" else None

    dtype = getattr(torch, args.dtype)
    built = time.perf_counter()
    model = shaped_model(args.shape, args.blocks, args.seq_len, dtype)
    build_seconds = time.perf_counter() - built
    ids = torch.randint(0, 32000, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(method=args.method, sparsity=0.5, calibration_samples=args.samples, seq_len=args.seq_len)
    saved: dict[int, BlockResult] = {}
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    summary = prune_model(
        model,
        ids,
        recipe,
        device=args.device,
        progress=False,
        forward_budget_mib=args.forward_budget_mib,
        on_block=(lambda r: saved.__setitem__(r.index, r)) if args.check_resume else None,
    )
    phases = summary.phase_seconds
    per_block = sum(phases.values()) / args.blocks
    embedding = summary.seconds - sum(phases.values())
    first_block = f"model.layers.{args.blocks - 1}."
    row = {
        "shape": args.shape,
        "method": args.method,
        "blocks": args.blocks,
        "seconds_per_block": per_block,
        "phase_seconds_per_block": {k: v / args.blocks for k, v in phases.items()},
        "linear_seconds_last_block": {
            k.removeprefix(first_block): v for k, v in summary.linear_seconds.items() if k.startswith(first_block)
        },
        "embedding_and_transfer_seconds": embedding,
        "projected_model_minutes": (per_block * SHAPES[args.shape]["model_blocks"] + embedding) / 60,
        "weights_dtype": sorted({str(p.dtype) for p in model.parameters()}),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
        "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "build_seconds": build_seconds,
    }
    if apt_steps:
        row["apt_steps_per_block"] = {
            "select_seconds": apt_steps["select_seconds"] / args.blocks,
            "refit_seconds": apt_steps["refit_seconds"] / args.blocks,
            "refit_iterations": apt_steps["refit_iterations"],
        }
    if args.check_resume:
        row["resume_bit_identical"] = resume_is_bit_identical(args, recipe, saved, model, dtype)
    return row


def resume_is_bit_identical(args: argparse.Namespace, recipe, saved: dict, pruned, dtype: torch.dtype) -> bool:
    """Prune the last block again in a fresh model from the checkpointed state, as a resumed run would."""
    from pruning_core.engine import prune_model, restore_blocks

    last = args.blocks - 1
    fresh = shaped_model(args.shape, args.blocks, args.seq_len, dtype)
    restore_blocks(fresh, [saved[i].state_dict for i in range(last)])
    ids = torch.randint(0, 32000, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    prune_model(
        fresh,
        ids,
        recipe,
        device=args.device,
        progress=False,
        start_block=last,
        start_inputs=saved[last - 1].next_inputs,
        forward_budget_mib=args.forward_budget_mib,
    )
    expected = pruned.model.layers[last].state_dict()
    return all(torch.equal(t, expected[k]) for k, t in fresh.model.layers[last].state_dict().items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["7b", "70b"], choices=sorted(SHAPES))
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "apt"])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--forward-budget-mib", type=int, help="default: the engine's for the device")
    parser.add_argument("--check-resume", action="store_true", help="also check a resumed last block bit for bit")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check_resume and args.blocks < 2:
        parser.error("--check-resume needs --blocks 2 or more")

    if args.child:
        args.shape, args.method = args.child
        print(json.dumps(one_run(args)))
        return

    rows: list[dict] = []
    # A run stopped by a time limit (SIGTERM) still writes the rows it has.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        measure_all(args, rows)
    finally:
        device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.processor() or 'unknown'})"
        settings = {k: getattr(args, k) for k in ("blocks", "samples", "seq_len", "dtype", "forward_budget_mib")}
        write_results("scale-shapes", {"device": device, **settings}, rows, args.out)


def measure_all(args: argparse.Namespace, rows: list[dict]) -> None:
    for shape in args.shapes:
        for method in args.methods:
            arguments = ["--child", shape, method, "--blocks", str(args.blocks), "--samples", str(args.samples)]
            arguments += ["--seq-len", str(args.seq_len), "--dtype", args.dtype, "--device", args.device]
            arguments += ["--forward-budget-mib", str(args.forward_budget_mib)] if args.forward_budget_mib else []
            arguments += ["--check-resume"] if args.check_resume else []
            try:
                row = run_child(__spec__.name, arguments)
            except RuntimeError as error:  # e.g. out of memory: recorded, and the other runs go on
                rows.append({"shape": shape, "method": method, "error": str(error)})
                print(f"{shape} {method} failed: {error}", flush=True)
                continue
            rows.append(row)
            phases = " ".join(f"{k} {v:.1f}s" for k, v in row["phase_seconds_per_block"].items())
            print(
                f"{shape:<10} {method:<9} {row['seconds_per_block']:7.1f} s/block ({phases}) "
                f"projected {row['projected_model_minutes']:6.1f} min  peak GPU {row['peak_gpu_gib'] or 0:.1f} GiB "
                f"host {row['peak_host_gib']:.1f} GiB {row.get('apt_steps_per_block', '')}",
                flush=True,
            )


if __name__ == "__main__":
    main()
