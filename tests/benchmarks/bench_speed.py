"""Benchmark (run on demand): what a variant gains at inference, measured as `evaluation.speed` measures it.

    .venv/bin/python -m tests.benchmarks.bench_speed --model smollm2               # CPU: dense, 2:4, LLM-Pruner 20%
    python -m tests.benchmarks.bench_speed --shapes 7b 70b --blocks 4 2 --device cuda   # GPU: dense vs 2:4 kernels

Per variant: prefill tokens/s of a 512-token prompt and decode tokens/s of 128 greedy tokens, batch 1 and 8,
median of 3 after a warm-up (`pruning_core.speed`). A 2:4 variant on a CUDA GPU of compute capability 8.0+
is measured again with PyTorch's semi-structured sparse kernels; the ratio sparse / dense kernels is reported
even when below 1. `--shapes` builds random-initialised LLaMA-2 shapes in bf16 (a few blocks: --blocks per
shape); 2:4 there is magnitude (the kernels' speed does not depend on which weights were kept).
Writes tests/benchmarks/results/speed-<timestamp>.json (or --out).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch import nn

from pruning_core.adapters import adapter_for
from pruning_core.speed import SpeedProtocol, measure_speed
from tests.benchmarks.common import RESULTS, write_results


def two_four_by_magnitude(model: nn.Module) -> int:
    """Zero the 2 smallest |w| of every 4 consecutive inputs of each block linear; returns linears changed."""
    adapter, changed = adapter_for(model), 0
    for block in adapter.blocks(model):
        for module in block.modules():
            if isinstance(module, nn.Linear) and module.weight.shape[1] % 4 == 0:
                with torch.no_grad():
                    groups = module.weight.view(module.weight.shape[0], -1, 4)
                    smallest = groups.abs().argsort(dim=-1)[..., :2]
                    groups.scatter_(-1, smallest, 0)
                changed += 1
    return changed


def measure(name: str, variant: str, model: nn.Module, protocol: SpeedProtocol) -> dict:
    started = time.perf_counter()
    result = measure_speed(model, protocol)
    row = {
        "model": name,
        "variant": variant,
        "device": result.device,
        "dtype": result.dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "metrics": result.metrics,
        "notes": result.notes,
        "seconds": time.perf_counter() - started,
    }
    metrics = result.metrics
    cells = "  ".join(f"{key} {metrics[key]:.1f}" for key in sorted(metrics) if "_tok_s." in key and "ratio" not in key)
    ratios = "  ".join(f"{key} {value:.2f}" for key, value in sorted(metrics.items()) if "ratio" in key)
    print(f"{name:<10} {variant:<22} {cells}  {ratios}  {result.notes or ''}", flush=True)
    return row


def smollm2_rows(protocol: SpeedProtocol, device: str) -> list[dict]:
    from infra.assets import smollm2_gguf, text_asset
    from pruning_core.data import calibration_windows, read_rows, tokenize_text
    from pruning_core.modeling import load_for_compute
    from pruning_core.structured.llm_pruner import StructuredSettings, prune_structured

    dense, tokenizer = load_for_compute(str(smollm2_gguf()), device)
    rows = [measure("smollm2", "dense", dense.to(device), protocol)]
    sparse = copy.deepcopy(dense)
    two_four_by_magnitude(sparse)
    rows.append(measure("smollm2", "2:4", sparse, protocol))
    del sparse
    ids = calibration_windows(tokenize_text(tokenizer, read_rows(str(text_asset("c4.utf8")))), 4, 128, seed=0)
    structured = copy.deepcopy(dense)
    prune_structured(structured, ids, StructuredSettings(ratio=0.2), device, progress=False)
    rows.append(measure("smollm2", "llm_pruner 20% params", structured, protocol))
    return rows


def shape_rows(shape: str, blocks: int, protocol: SpeedProtocol, device: str) -> list[dict]:
    from tests.benchmarks.bench_scale_shapes import shaped_model

    model = shaped_model(shape, blocks, protocol.prefill_tokens + protocol.decode_tokens, torch.bfloat16).to(device)
    name = f"{shape} x{blocks}"
    rows = [measure(name, "dense", model, protocol)]
    two_four_by_magnitude(model)
    rows.append(measure(name, "2:4 (magnitude)", model, protocol))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2"], default=None)
    parser.add_argument("--shapes", nargs="+", default=[], choices=["7b", "70b", "7b-quarter"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[4], help="blocks per shape (one value: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    protocol = SpeedProtocol(
        prefill_tokens=args.prefill_tokens,
        decode_tokens=args.decode_tokens,
        batch_sizes=tuple(args.batch_sizes),
        repeats=args.repeats,
    )
    rows = smollm2_rows(protocol, args.device) if args.model == "smollm2" else []
    blocks = args.blocks * len(args.shapes) if len(args.blocks) == 1 else args.blocks
    for shape, count in zip(args.shapes, blocks, strict=True):
        rows.extend(shape_rows(shape, count, protocol, args.device))
        torch.cuda.empty_cache() if args.device == "cuda" else None
    header = {
        "protocol": protocol.__dict__ | {"batch_sizes": list(protocol.batch_sizes)},
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
    }
    write_results("speed", header, rows, args.out)


if __name__ == "__main__":
    main()
