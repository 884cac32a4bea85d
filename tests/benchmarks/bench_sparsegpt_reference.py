"""Benchmark (run on demand): secateur's SparseGPT against the reference implementation, same model and data.

    git clone https://github.com/IST-DASLab/sparsegpt /tmp/sparsegpt    # the reference (not a dependency)
    .venv/bin/python -m tests.benchmarks.bench_sparsegpt_reference --reference /tmp/sparsegpt
    .venv/bin/python -m tests.benchmarks.bench_sparsegpt_reference --reference /tmp/sparsegpt --targets 0.5 2:4

The reference side drives `sparsegpt.SparseGPT` (its `add_batch` and `fasterprune`) exactly as its `llama.py`
does: one sample per block forward, one Hessian per linear, all linears of a block at once, then the block
re-run for the next block's inputs. Only what transformers 5 needs changed: the block gets every keyword
argument the model passes it (rotary embeddings), captured by secateur's own first-block hook. Both sides use
SmolLM2-135M (float32), the same calibration windows and the same perplexity protocol; each run is its own
process, so peak RSS is its own. Writes tests/benchmarks/results/sparsegpt-reference-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from tests.benchmarks.common import SMOLLM2, WIKITEXT_TEST, run_child, write_results


def prune_reference(model, ids: torch.Tensor, target: str, reference: Path) -> None:
    """IST-DASLab/sparsegpt's llama_sequential loop (no quantization, all linears of a block at once)."""
    sys.path.insert(0, str(reference))
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None  # fasterprune times itself with a CUDA sync
    from sparsegpt import SparseGPT  # the reference checkout, not part of secateur

    from pruning_core.adapters import adapter_for
    from pruning_core.blocks import capture_block_inputs, run_block

    sparsity, prunen, prunem = (0.5, *map(int, target.split(":"))) if ":" in target else (float(target), 0, 0)
    adapter = adapter_for(model)
    captured = capture_block_inputs(model, adapter.blocks(model), ids)
    inps = captured.hidden
    outs = torch.zeros_like(inps)
    with torch.no_grad():
        for layer, kwargs in zip(adapter.blocks(model), captured.kwargs, strict=True):
            subset = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
            gpts = {name: SparseGPT(module) for name, module in subset.items()}
            handles = [
                module.register_forward_hook(lambda _, inp, out, gpt=gpts[name]: gpt.add_batch(inp[0].data, out.data))
                for name, module in subset.items()
            ]
            for j in range(len(inps)):
                outs[j] = run_block(layer, inps[j].unsqueeze(0), kwargs)[0]
            for handle in handles:
                handle.remove()
            for name in subset:
                gpts[name].fasterprune(sparsity, prunen=prunen, prunem=prunem, percdamp=0.01, blocksize=128)
                gpts[name].free()
            for j in range(len(inps)):
                outs[j] = run_block(layer, inps[j].unsqueeze(0), kwargs)[0]
            inps, outs = outs, inps


def one_run(args: argparse.Namespace) -> dict:
    from infra.assets import smollm2_gguf, text_asset
    from pruning_core.data import read_rows
    from pruning_core.engine import prune_model
    from pruning_core.job import calibration_set, evaluate_perplexities
    from pruning_core.modeling import load_model
    from pruning_core.recipe import Recipe

    model, tokenizer = load_model(str(smollm2_gguf()))
    target = {"pattern": args.target} if ":" in args.target else {"sparsity": float(args.target)}
    recipe = Recipe(method=args.method, calibration_samples=args.samples, seq_len=args.seq_len, **target)
    ids = calibration_set(tokenizer, read_rows(str(text_asset("c4.utf8"))), recipe)
    started = time.perf_counter()
    if args.side == "reference":
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # the reference prints per layer
            prune_reference(model, ids, args.target, args.reference)
    else:
        prune_model(model, ids, recipe, progress=False)
    seconds = time.perf_counter() - started
    ppl = evaluate_perplexities(
        model,
        tokenizer,
        {"wikitext2": read_rows(str(WIKITEXT_TEST))},
        args.eval_seq_len,
        args.eval_tokens,
        progress=False,
    )["wikitext2"]
    return {
        "prune_seconds": seconds,
        "perplexity": ppl.perplexity,
        "tokens_scored": ppl.tokens_scored,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of IST-DASLab/sparsegpt")
    parser.add_argument("--targets", nargs="+", default=["0.5", "2:4"])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.method = "sparsegpt"
    if not (args.reference / "sparsegpt.py").is_file():
        raise SystemExit(f"error: {args.reference} is not a checkout of IST-DASLab/sparsegpt (no sparsegpt.py)")
    if args.child:
        args.side, args.target = args.child
        print(json.dumps(one_run(args)))
        return

    rows = []
    for target in args.targets:
        for side in ("reference", "secateur"):
            arguments = ["--child", side, target, "--reference", str(args.reference), "--samples", str(args.samples)]
            arguments += ["--seq-len", str(args.seq_len), "--eval-seq-len", str(args.eval_seq_len)]
            arguments += ["--eval-tokens", str(args.eval_tokens)]
            rows.append({"side": side, "target": target, **run_child(__spec__.name, arguments)})
            row = rows[-1]
            print(
                f"{side:<9} {target:>4} prune {row['prune_seconds']:7.1f} s  ppl {row['perplexity']:8.2f}  "
                f"peak RSS {row['peak_rss_mib']:6.0f} MiB",
                flush=True,
            )
        reference, ours = rows[-2], rows[-1]
        print(
            f"{target}: secateur / reference time {ours['prune_seconds'] / reference['prune_seconds']:.2f}x, "
            f"perplexity {ours['perplexity'] / reference['perplexity']:.3f}x",
            flush=True,
        )
    header = {
        "model": SMOLLM2,
        "calibration": f"exllamav2 c4.utf8, {args.samples} x {args.seq_len} tokens, seed 0",
        "evaluation": f"WikiText-2 raw test, seq_len {args.eval_seq_len}, first {args.eval_tokens} tokens",
        "reference": "IST-DASLab/sparsegpt sparsegpt.py (SparseGPT.add_batch/fasterprune), llama.py's loop",
    }
    write_results("sparsegpt-reference", header, rows)


if __name__ == "__main__":
    main()
