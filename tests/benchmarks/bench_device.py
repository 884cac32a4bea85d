"""Benchmark (run on demand, on a GPU machine): the engine on `cuda` vs `cpu`, every method.

    python -m tests.benchmarks.bench_device [--layers 4] [--samples 32] [--seq-len 512] [--out DIR]

A random Llama with SmolLM2-135M's shapes (hidden 576, MLP 1536, 9 heads, 3 KV heads), pruned at 50%
and 2:4 on random token windows: wall time per device, achieved sparsity, mean reconstruction error,
and the agreement of the CUDA result with the CPU one (fraction of identical mask entries).
Writes pipeline-independent JSON: tests/benchmarks/results/device-<timestamp>.json (or --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from pruning_core.adapters import adapter_for
from pruning_core.engine import prune_model
from pruning_core.methods import METHODS
from pruning_core.recipe import Recipe

RESULTS = Path(__file__).resolve().parent / "results"


def smollm2_shaped(layers: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def linear_weights(model) -> dict[str, torch.Tensor]:
    adapter = adapter_for(model)
    return {
        f"{i}.{name}": blk.get_submodule(name).weight.detach().float().cpu()
        for i, blk in enumerate(adapter.blocks(model))
        for name in adapter.linear_names(blk)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_device needs a CUDA device")
    dense = smollm2_shaped(args.layers)
    calibration = torch.randint(0, 49152, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    rows = []
    for target in ({"sparsity": 0.5}, {"pattern": "2:4"}):
        for method in METHODS:
            recipe = Recipe(method=method, calibration_samples=args.samples, seq_len=args.seq_len, **target)
            entry = {"method": method, "target": recipe.target.describe()}
            results = {}
            for device in ("cuda", "cpu"):
                model = copy.deepcopy(dense)
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                summary = prune_model(model, calibration, recipe, device=device, progress=False)
                if device == "cuda":
                    torch.cuda.synchronize()
                    entry["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
                entry[f"{device}_seconds"] = time.perf_counter() - started
                entry[f"{device}_mean_error"] = sum(summary.errors.values()) / len(summary.errors)
                results[device] = linear_weights(model)
            same = sum(int(((results["cuda"][k] == 0) == (results["cpu"][k] == 0)).sum()) for k in results["cpu"])
            total = sum(w.numel() for w in results["cpu"].values())
            zeros = sum(int((w == 0).sum()) for w in results["cuda"].values())
            entry.update(mask_agreement=same / total, cuda_sparsity=zeros / total)
            print(json.dumps(entry))
            rows.append(entry)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "layers": args.layers,
        "calibration": f"{args.samples} x {args.seq_len} random tokens",
        "runs": rows,
    }
    path = args.out / f"device-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
