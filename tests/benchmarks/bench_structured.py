"""Benchmark (run on demand): LLM-Pruner on SmolLM2-135M, without and with LoRA recovery.

    .venv/bin/python -m tests.benchmarks.bench_structured                       # ratio 0.2, element1, 200 steps
    .venv/bin/python -m tests.benchmarks.bench_structured --importances element1 element2 vector
    .venv/bin/python -m tests.benchmarks.bench_structured --latency-of /tmp/secateur-bench-structured/element1
    .venv/bin/python -m tests.benchmarks.bench_structured --model gemma3 --steps 0 --samples 8 --seq-len 256 \
        --eval-seq-lens 1024 --eval-tokens 4096 --latency-repeats 3     # Gemma 3 270M (embeddings: 168M of 268M)

For each importance: prune 20% of the parameters (first 4 and last 2 blocks kept whole), then LoRA
recovery (r=8, alpha=16, dropout 0.05, all projections) on exllamav2's c4 text. Reports WikiText-2 raw
test perplexity at seq 128 and 512 (all tokens unless --eval-tokens), parameters, size on disk and the
CPU latency of one forward pass, against the dense model. Writes results/structured-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tests.benchmarks.bench_pruning import C4_CALIBRATION, GEMMA3, WIKITEXT_TEST, gemma3_folder
from tests.benchmarks.common import RESULTS, SMOLLM2


def _folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20


def _measure(model, tokenizer, rows: list[str], args: argparse.Namespace) -> dict:
    from pruning_core.job import evaluate_perplexities
    from pruning_core.structured.llm_pruner import forward_latency_ms, parameter_count

    row = {"parameters": parameter_count(model)}
    for seq_len in args.eval_seq_lens:
        result = evaluate_perplexities(model, tokenizer, {"w": rows}, seq_len, args.eval_tokens, progress=False)["w"]
        row[f"ppl_{seq_len}"] = result.perplexity
        row[f"tokens_{seq_len}"] = result.tokens_scored
    for tokens in (128, 512):
        row[f"latency_ms_{tokens}"] = forward_latency_ms(model, tokens, repeats=args.latency_repeats)
    print(json.dumps(row), flush=True)
    return row


def interleaved_latency(folders: list[str], repeats: int) -> dict:
    """CPU latency of the dense model and saved pruned folders, measured in alternation so drift hits all alike."""
    from infra.assets import smollm2_gguf
    from pruning_core.modeling import load_model
    from pruning_core.structured.llm_pruner import forward_latency_ms, parameter_count

    models = {"dense": load_model(str(smollm2_gguf()))[0]}
    models |= {folder: load_model(folder)[0] for folder in folders}
    times: dict[str, dict[int, list[float]]] = {name: {128: [], 512: []} for name in models}
    for _ in range(repeats):
        for tokens in (128, 512):
            for name, model in models.items():
                times[name][tokens].append(forward_latency_ms(model, tokens, repeats=1))
    result = {
        name: {
            "parameters": parameter_count(models[name]),
            **{f"latency_ms_{t}": sorted(v)[len(v) // 2] for t, v in per_tokens.items()},
        }
        for name, per_tokens in times.items()
    }
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    from infra.assets import smollm2_gguf, text_asset
    from pruning_core.data import read_rows
    from pruning_core.job import calibration_set, prune_structured_to_folder, recover_to_folder
    from pruning_core.modeling import load_model
    from pruning_core.recipe import Recipe

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--importances", nargs="+", default=["element1"])
    parser.add_argument("--samples", type=int, default=32, help="calibration windows for the gradients")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200, help="LoRA recovery steps (0: none)")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--recovery-seq-len", type=int, default=128)
    parser.add_argument("--eval-seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--eval-tokens", type=int, default=None, help="score only the first N tokens (default all)")
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="/tmp/secateur-bench-structured")
    parser.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    parser.add_argument("--latency-of", nargs="+", metavar="FOLDER", help="only: dense vs these folders' latency")
    args = parser.parse_args()
    if args.latency_of:
        result = interleaved_latency(args.latency_of, args.latency_repeats)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"latency-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=2))
        return

    rows = read_rows(str(WIKITEXT_TEST))
    c4 = str(text_asset(C4_CALIBRATION))
    source = str(gemma3_folder(args.out)) if args.model == "gemma3" else str(smollm2_gguf())
    model, tokenizer = load_model(source)
    results = {
        "model": GEMMA3 if args.model == "gemma3" else SMOLLM2,
        "calibration": f"exllamav2 {C4_CALIBRATION}, {args.samples} x {args.seq_len} tokens, seed 0",
        "recovery": f"LoRA r=8 alpha=16 dropout 0.05, all projections, {args.steps} steps x {args.batch_size} x "
        f"{args.recovery_seq_len} tokens of exllamav2 {C4_CALIBRATION}, AdamW lr {args.learning_rate}",
        "evaluation": f"WikiText-2 raw test, seq_len {args.eval_seq_lens}, tokens {args.eval_tokens or 'all'}",
        "latency": f"CPU forward pass, batch 1, median of {args.latency_repeats}, {torch.get_num_threads()} threads",
        "device": args.device,
        "machine": platform.processor() or platform.machine(),
        "runs": [{"model": "dense", **_measure(model, tokenizer, rows, args)}],
    }
    RESULTS.mkdir(exist_ok=True)
    out_file = RESULTS / f"structured-{time.strftime('%Y%m%d-%H%M%S')}.json"
    for importance in args.importances:
        model, tokenizer = load_model(source)
        recipe = Recipe(
            method="llm_pruner",
            ratio=args.ratio,
            importance=importance,
            calibration_samples=args.samples,
            seq_len=args.seq_len,
        )
        calibration = calibration_set(tokenizer, read_rows(c4), recipe)
        folder = Path(args.out) / importance
        started = time.perf_counter()
        report = prune_structured_to_folder(model, tokenizer, calibration, recipe, folder, args.device, False)
        row = {"model": f"llm_pruner {importance}", "prune_seconds": time.perf_counter() - started}
        row |= {"size_mib": _folder_mib(folder), "block_share": report.structure.block_share}
        row |= _measure(model, tokenizer, rows, args)
        results["runs"].append(row)
        out_file.write_text(json.dumps(results, indent=2))
        if args.steps:
            spec = recipe.model_validate(
                {
                    **recipe.model_dump(),
                    "recovery": {
                        "data": c4,
                        "steps": args.steps,
                        "learning_rate": args.learning_rate,
                        "batch_size": args.batch_size,
                        "seq_len": args.recovery_seq_len,
                    },
                }
            ).recovery
            started = time.perf_counter()
            merged, result = recover_to_folder(
                model, tokenizer, read_rows(c4), spec, f"{folder}-lora", args.device, False
            )
            row = {"model": f"llm_pruner {importance} + LoRA", "recovery_seconds": time.perf_counter() - started}
            row |= {"loss_first": result.losses[0], "loss_last": sum(result.losses[-10:]) / 10}
            row |= {"size_mib": _folder_mib(Path(f"{folder}-lora"))}
            row |= _measure(merged, tokenizer, rows, args)
            results["runs"].append(row)
            out_file.write_text(json.dumps(results, indent=2))
    out_file.write_text(json.dumps(results, indent=2))
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
