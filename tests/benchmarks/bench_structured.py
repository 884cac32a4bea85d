"""Benchmark (run on demand): structured pruning that pays off when served, with distillation recovery.

    .venv/bin/python -m tests.benchmarks.bench_structured                  # SmolLM2-135M: width 20% of all, depth
    .venv/bin/python -m tests.benchmarks.bench_structured --speed-of /tmp/secateur-bench-structured/smollm2/*-distilled
    .venv/bin/python -m tests.benchmarks.bench_structured --speed-of FOLDER --runtime llama.cpp --gguf-type bf16
    .venv/bin/python -m tests.benchmarks.bench_structured --speed-widths 1024 896 768 --runtime llama.cpp
    .venv/bin/python -m tests.benchmarks.bench_structured --model gemma3 --ratio 0.2 --ratio-of decoder \
        --variants width --no-lora --samples 64 --seq-len 256 --eval-seq-len 1024 --eval-tokens 8192 \
        --second-text-tokens 4096 --distill-seq-len 1024 --distill-batch 1 --distill-lr 5e-5 \
        --distill-seconds 600 --embeddings freeze --eval-every 6 --heldout-tokens 4096

Distil at the length the model is scored (and served) at: Gemma 3 distilled on 256-token windows got worse
at 1024 (WikiText-2 75.7 -> 77.0, C4 88.5 -> 105.2) while its 256-token held-out perplexity fell.

For the dense model and each variant: WikiText-2 raw test perplexity (the first --eval-tokens tokens at
--eval-seq-len), perplexity on a second text never trained on (exllamav2's C4 text), parameters (decoder,
embeddings, all), size on disk, prefill and decode tokens/s at batch 1 and 8 (`pruning_core.speed`, the
pipeline's own measurement), and whether plain `from_pretrained` loads the folder. `--speed-of` measures saved
folders against dense in alternation, with transformers or served by llama.cpp (`tests.benchmarks.llama_cpp`:
built from PyPI's llama-cpp-python sdist, folders converted by llama.cpp's own converter); `--speed-widths`
adds the dense model cut to those MLP widths (speed depends on shapes only), to draw speed against width.
Variants:
- width: llm_pruner, uniform widths (a stock config), `--ratio` of `--ratio-of`;
- depth: whole blocks removed, as many parameters as width removes (equal parameter count), chosen by
  calibration-loss increase; block influence (1 - cos) is measured beside it, before recovery.
Each is distilled from the dense model (KL on logits, all weights, cosine schedule) on exllamav2's Wikipedia
text for `--distill-tokens` tokens (or as many as a pilot says fit in `--distill-seconds`), embeddings
trained or frozen (`--embeddings`); the held-out curve goes to the results and a plot. With LoRA on (default
for SmolLM2), the width variant is also recovered by LoRA on next-token loss for the same wall time.
Writes results/structured-<timestamp>.json and structured-<timestamp>-curve.png.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from tests.benchmarks.bench_pruning import C4_CALIBRATION, GEMMA3, gemma3_folder
from tests.benchmarks.common import RESULTS, SMOLLM2, WIKITEXT_TEST, write_results

DISTILL_TEXT = "wiki.utf8"  # exllamav2's Wikipedia text: not WikiText-2, not the C4 text scored beside it


def _folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20


def _quality(model, tokenizer, texts: dict[str, list[str]], args: argparse.Namespace) -> dict:
    """WikiText-2 on its first --eval-tokens tokens, the second text on its first --second-text-tokens."""
    from pruning_core.job import evaluate_perplexities

    limits = {"wikitext2": args.eval_tokens, "c4": args.second_text_tokens}
    return {
        f"ppl.{name}": evaluate_perplexities(
            model, tokenizer, {name: rows}, args.eval_seq_len, limits[name], progress=False
        )[name].perplexity
        for name, rows in texts.items()
    }


def _speed(model, args: argparse.Namespace) -> dict:
    from pruning_core.speed import SpeedProtocol, throughput

    protocol = SpeedProtocol(
        prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens, batch_sizes=(1, 8), repeats=3
    )
    return throughput(model, protocol)


def _alternated(measures: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict[str, dict]:
    """Each measure run once per round in turn, so that whatever else the machine does hits every model alike;
    the median of `rounds` per metric, and its gain over the first (dense) model's."""
    import statistics

    samples: dict[str, list[dict[str, float]]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            samples[name].append(measure())
    medians = {
        name: {key: statistics.median(s[key] for s in runs) for key in runs[0]} for name, runs in samples.items()
    }
    dense = next(iter(medians.values()))
    return {
        name: {**speed, "gain": {k: v / dense[k] for k, v in speed.items() if "tok_s" in k}}
        for name, speed in medians.items()
    }


def interleaved_speed(source: str, folders: list[str], rounds: int, args: argparse.Namespace) -> dict:
    """Throughput of dense and saved variants with transformers, measured in alternation."""
    from pruning_core.modeling import load_model
    from pruning_core.speed import SpeedProtocol, throughput

    protocol = SpeedProtocol(
        prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens, batch_sizes=(1, 8), repeats=1
    )
    models = {"dense": load_model(source)[0], **{folder: _stock_load(Path(folder)) for folder in folders}}
    return _alternated({name: partial(throughput, model, protocol) for name, model in models.items()}, rounds)


def dense_folder(source: str, scratch: Path) -> Path:
    """The dense model as a transformers folder (a GGUF source dequantized and saved once)."""
    from pruning_core.modeling import load_model, save_model

    if (Path(source) / "config.json").is_file():
        return Path(source)
    folder = scratch / "dense"
    if not (folder / "config.json").is_file():
        save_model(*load_model(source), folder)
    return folder


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(weight.detach().clone())
    return layer


def width_folders(dense: Path, widths: list[int], scratch: Path) -> list[str]:
    """The dense folder cut to each uniform MLP width (its first channels): serving speed depends on the shapes,
    not on which channels are kept or their values, so this draws speed against width without pruning."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = []
    for width in widths:
        folder = scratch / f"speed-width{width}"
        if not (folder / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
            for block in model.model.layers:
                mlp = block.mlp
                mlp.gate_proj, mlp.up_proj, mlp.down_proj = (
                    _linear(mlp.gate_proj.weight[:width]),
                    _linear(mlp.up_proj.weight[:width]),
                    _linear(mlp.down_proj.weight[:, :width]),
                )
            model.config.intermediate_size = width
            model.save_pretrained(folder)
            AutoTokenizer.from_pretrained(dense).save_pretrained(folder)
        folders.append(str(folder))
    return folders


def llama_cpp_speed(dense: Path, folders: list[str], args: argparse.Namespace) -> dict:
    """Throughput under llama.cpp (`llama-batched-bench`) of dense and each folder, converted to GGUF by
    llama.cpp's converter at `--gguf-type`, measured in alternation (median of `--rounds`)."""
    from tests.benchmarks.llama_cpp import batched_bench, to_gguf

    names = {"dense": dense, **{folder: Path(folder) for folder in folders}}
    ggufs = {
        name: to_gguf(folder, Path(args.out) / "gguf" / f"{folder.name}-{args.gguf_type}.gguf", args.gguf_type)
        for name, folder in names.items()
    }
    bench = partial(
        batched_bench,
        prompt_tokens=args.prefill_tokens,
        new_tokens=args.decode_tokens,
        batch_sizes=(1, 8),
        threads=torch.get_num_threads(),
    )
    speeds = _alternated({name: partial(bench, gguf=gguf) for name, gguf in ggufs.items()}, args.rounds)
    return {name: {**speed, "gguf_mib": ggufs[name].stat().st_size / 2**20} for name, speed in speeds.items()}


def _stock_load(folder: Path):
    """The folder as plain transformers loads it (no secateur code in the path)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _row(name: str, model, tokenizer, texts, args, folder: Path | None = None, **extra) -> dict:
    from pruning_core.footprint import footprint

    counts = footprint(model)
    row = {
        "variant": name,
        **extra,
        "parameters": counts.parameters,
        "decoder_parameters": counts.decoder_parameters,
        "embedding_parameters": counts.embedding_parameters,
        "loaded_mib": counts.loaded_mib,
        **_quality(model, tokenizer, texts, args),
    }
    if folder is not None:
        row["size_mib"] = _folder_mib(folder)
    print(json.dumps(row), flush=True)
    return row


def _distill(model, teacher, tokenizer, args, out: Path):
    from pruning_core.data import read_rows
    from pruning_core.distill import DistillSpec
    from pruning_core.job import recover_to_folder

    spec = DistillSpec(
        kind="distill",
        data=args.distill_data,
        tokens=args.distill_tokens,
        batch_size=args.distill_batch,
        seq_len=args.distill_seq_len,
        learning_rate=args.distill_lr,
        lm_weight=args.distill_lm_weight,
        hidden_weight=args.distill_hidden_weight,
        eval_every=args.eval_every,
        heldout_tokens=args.heldout_tokens,
        precision=args.precision,
        embeddings=args.embeddings,
        compile=args.compile,
    )
    if args.distill_seconds:
        spec = _sized_to(args.distill_seconds, spec, model, teacher, tokenizer, args)
    started = time.perf_counter()
    student, result = recover_to_folder(
        model, tokenizer, read_rows(spec.data), spec, out, args.device, False, teacher=teacher
    )
    seconds = time.perf_counter() - started
    tokens_per_step = spec.batch_size * spec.seq_len
    curve = {str(step * tokens_per_step): ppl for step, ppl in result.heldout.items()}
    return student, {
        "recovery": "distill",
        "recovery_seconds": seconds,
        "steps": spec.steps,
        "tokens": spec.steps * tokens_per_step,
        "heldout_curve": curve,
    }


PILOT_STEPS = 4


def _steps_in(seconds: float, pilot, compiles: bool = False) -> int:
    """How many steps fit in `seconds`, from `pilot(n)` (n steps on a copy): one untimed call pays for the
    allocations, kernel selection and, with compiled blocks, the compiling that the run pays once (timed cold,
    142 steps were sized for 900 s and took 698 s); then a step's time is the difference of PILOT_STEPS and
    2 x PILOT_STEPS warm steps, so that each call's set-up is not counted as steps (counted so, 190 compiled
    steps sized for 900 s took 728 s; from 3 and 6, 212 steps took 700 s). The set-up, and the compiling when
    `compiles`, come off the budget."""
    started = time.perf_counter()
    pilot(PILOT_STEPS)
    cold = time.perf_counter() - started
    timed = []
    for steps in (PILOT_STEPS, 2 * PILOT_STEPS):
        started = time.perf_counter()
        pilot(steps)
        timed.append(time.perf_counter() - started)
    step = (timed[1] - timed[0]) / PILOT_STEPS
    setup = max(0.0, timed[0] - PILOT_STEPS * step)
    budget = seconds - setup - (cold - timed[0] if compiles else 0.0)
    return max(1, round(budget / step))


def _sized_to(seconds: float, spec, model, teacher, tokenizer, args):
    """`spec` with the token budget a pilot (on a copy, no held-out passes) says fits in `seconds`
    of training; the held-out measurements come on top."""
    from pruning_core.data import read_rows, tokenize_text
    from pruning_core.distill import distill

    batch_tokens = spec.batch_size * spec.seq_len
    tokens = tokenize_text(tokenizer, read_rows(spec.data))

    def pilot(steps: int) -> None:
        short = spec.model_copy(update={"tokens": steps * batch_tokens, "heldout_tokens": 0})
        distill(_copy(model), teacher, tokens, short, args.device, progress=False)

    steps = _steps_in(seconds, pilot, spec.compile)
    return spec.model_copy(update={"tokens": steps * batch_tokens})


def _lora_for(seconds: float, model, tokenizer, args, out: Path):
    """LoRA on next-token loss, its steps sized from a pilot to take `seconds`."""
    from pruning_core.data import read_rows, tokenize_text
    from pruning_core.job import recover_to_folder
    from pruning_core.recovery import RecoverySpec, recover

    lora = {"data": args.distill_data, "batch_size": args.distill_batch, "seq_len": args.distill_seq_len}
    tokens = tokenize_text(tokenizer, read_rows(args.distill_data))

    def pilot(steps: int) -> None:
        recover(_copy(model), tokens, RecoverySpec(**lora, steps=steps, learning_rate=args.lora_lr), args.device, False)

    steps = _steps_in(seconds, pilot)
    spec = RecoverySpec(**lora, steps=steps, learning_rate=args.lora_lr)
    started = time.perf_counter()
    merged, _ = recover_to_folder(model, tokenizer, read_rows(args.distill_data), spec, out, args.device, False)
    return merged, {"recovery": "lora", "recovery_seconds": time.perf_counter() - started, "steps": steps}


def _influence_quality(source: str, removed: list[int], tokenizer, texts, args: argparse.Namespace) -> dict:
    """Perplexity with the blocks block influence would remove (the measure depth pruning did not choose)."""
    from pruning_core.modeling import load_model
    from pruning_core.structured.depth import remove_blocks

    model, _ = load_model(source)
    remove_blocks(model, removed)
    return _quality(model, tokenizer, texts, args)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _plot(rows: list[dict], path: Path) -> None:
    from infra.plots import _figure

    with _figure(path, "held-out perplexity while distilling", "distillation tokens", "perplexity") as axes:
        for row in rows:
            if row.get("heldout_curve"):
                points = sorted((int(k), v) for k, v in row["heldout_curve"].items())
                axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=row["variant"])
        axes.set_yscale("log")


def main() -> None:
    from infra.assets import smollm2_gguf, text_asset
    from pruning_core.data import read_rows
    from pruning_core.job import calibration_set, prune_structured_to_folder
    from pruning_core.modeling import load_model
    from pruning_core.structured.depth import block_importance

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    parser.add_argument("--variants", nargs="+", choices=["width", "depth"], default=["width", "depth"])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--ratio-of", choices=["decoder", "all"], default="all")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows for the importance")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--distill-tokens", type=int, default=160 * 1024)
    parser.add_argument("--distill-seconds", type=float, help="size the token budget to this training time")
    parser.add_argument("--distill-batch", type=int, default=2)
    parser.add_argument("--distill-seq-len", type=int, default=512)
    parser.add_argument("--distill-lr", type=float, default=2e-4)
    parser.add_argument("--distill-lm-weight", type=float, default=0.0, help="next-token loss beside the KL")
    parser.add_argument("--distill-hidden-weight", type=float, default=0.0, help="final hidden-state loss")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--precision", choices=["float32", "bfloat16", "auto"], default="auto", help="distillation")
    parser.add_argument("--embeddings", choices=["train", "freeze"], default="train", help="distillation")
    parser.add_argument("--compile", action="store_true", help="distillation: compile the decoder blocks")
    parser.add_argument("--heldout-tokens", type=int, default=4096)
    parser.add_argument("--no-lora", action="store_true", help="skip LoRA at equal time")
    parser.add_argument("--lora-lr", type=float, default=3e-4)
    parser.add_argument("--no-distill", action="store_true", help="LoRA only (with --lora-seconds)")
    parser.add_argument("--lora-seconds", type=float, help="LoRA's training time (default: distillation's)")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--second-text-tokens", type=int, default=8192)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="/tmp/secateur-bench-structured")
    parser.add_argument("--speed-of", nargs="+", metavar="FOLDER", help="only: dense vs these folders, interleaved")
    parser.add_argument(
        "--speed-widths", nargs="+", type=int, metavar="CHANNELS", help="--speed-of: also dense cut to these MLP widths"
    )
    parser.add_argument("--rounds", type=int, default=5, help="--speed-of: alternating rounds")
    parser.add_argument(
        "--runtime", choices=["transformers", "llama.cpp"], default="transformers", help="--speed-of: what serves"
    )
    parser.add_argument("--gguf-type", default="f32", help="--runtime llama.cpp: the converter's --outtype")
    args = parser.parse_args()
    if args.no_distill and not args.lora_seconds:
        parser.error("--no-distill needs --lora-seconds (LoRA's time is otherwise distillation's)")
    args.distill_data = str(text_asset(DISTILL_TEXT))
    from pruning_core.distill import resolved_precision

    args.precision = resolved_precision(args.precision, args.device)  # recorded as what ran
    if args.speed_of or args.speed_widths:
        source = str(gemma3_folder(args.out)) if args.model == "gemma3" else str(smollm2_gguf())
        scratch = Path(args.out) / args.model
        dense = dense_folder(source, scratch)
        folders = (args.speed_of or []) + width_folders(dense, args.speed_widths or [], scratch)
        if args.runtime == "llama.cpp":
            speeds = llama_cpp_speed(dense, folders, args)
        else:
            speeds = interleaved_speed(source, folders, args.rounds, args)
        runtime = f"{args.runtime} ({args.gguf_type} GGUF)" if args.runtime == "llama.cpp" else args.runtime
        header = {"speed": f"{runtime}, interleaved, median of {args.rounds} rounds, {torch.get_num_threads()} threads"}
        write_results("structured-speed", {**header, **vars(args)}, [{"model": k, **v} for k, v in speeds.items()])
        return

    c4 = str(text_asset(C4_CALIBRATION))
    texts = {"wikitext2": read_rows(str(WIKITEXT_TEST)), "c4": read_rows(c4)}
    source = str(gemma3_folder(args.out)) if args.model == "gemma3" else str(smollm2_gguf())
    out = Path(args.out) / args.model
    teacher, tokenizer = load_model(source)
    budget = f"{args.distill_seconds:.0f} s of training" if args.distill_seconds else f"{args.distill_tokens} tokens"
    header = {
        "model": GEMMA3 if args.model == "gemma3" else SMOLLM2,
        "calibration": f"exllamav2 {C4_CALIBRATION}, {args.samples} x {args.seq_len} tokens, seed 0",
        "recovery": f"distillation (KL on logits, T=1, next-token loss x{args.distill_lm_weight}, "
        f"hidden-state loss x{args.distill_hidden_weight}, all weights, embeddings {args.embeddings}, "
        f"{args.precision} autocast{', compiled blocks' if args.compile else ''}, AdamW lr "
        f"{args.distill_lr} cosine, warm-up 5%) "
        f"on exllamav2 {DISTILL_TEXT}, {budget} in windows of {args.distill_batch} x "
        f"{args.distill_seq_len}; LoRA (r=8, alpha=16) for the same wall time",
        "evaluation": f"WikiText-2 raw test, first {args.eval_tokens} tokens at seq_len {args.eval_seq_len}; "
        f"exllamav2 {C4_CALIBRATION} (first {args.second_text_tokens} tokens, never trained on)",
        "speed": f"prefill {args.prefill_tokens} tokens, decode {args.decode_tokens}, batch 1 and 8, median of 3, "
        f"{torch.get_num_threads()} threads, {args.device}",
    }
    rows = [_row("dense", teacher, tokenizer, texts, args, speed=_speed(teacher, args))]

    def save() -> Path:
        return write_results("structured", {**header, **vars(args)}, rows, folder=RESULTS)

    width_removed = None
    for variant in args.variants:
        model, _ = load_model(source)
        recipe = _recipe(variant, args, model, width_removed)
        calibration = calibration_set(tokenizer, read_rows(c4), recipe)
        started = time.perf_counter()
        folder = out / variant
        extra = {}
        if variant == "depth":
            extra["influence"] = block_importance(_copy(model), calibration, "influence", args.device, False)
        report = prune_structured_to_folder(model, tokenizer, calibration, recipe, folder, args.device, False)
        extra |= {"prune_seconds": time.perf_counter() - started, "recipe": recipe.model_dump(mode="json")}
        if variant == "depth":
            removed = report.structure.removed_blocks
            extra |= {"removed_blocks": removed, "loss_importance": report.structure.block_importance}
            by_influence = sorted(range(len(extra["influence"])), key=extra["influence"].__getitem__)
            extra["influence_would_remove"] = sorted(by_influence[: len(removed)])
            extra["influence_ppl"] = _influence_quality(source, extra["influence_would_remove"], tokenizer, texts, args)
        stock = _stock_load(folder)
        extra["loads_with_from_pretrained"] = report.structure.loads_with_from_pretrained
        rows.append(_row(f"{variant} (no recovery)", stock, tokenizer, texts, args, folder, **extra))
        if variant == "width":
            width_removed = report.structure.counts_before.total - report.structure.counts_after.total
        save()
        pruned = _copy(stock)
        if not args.no_distill:
            distilled_folder = out / f"{variant}-distilled"
            _, info = _distill(stock, teacher, tokenizer, args, distilled_folder)
            distilled = _stock_load(distilled_folder)
            info["speed"] = _speed(distilled, args)
            rows.append(_row(f"{variant} + distill", distilled, tokenizer, texts, args, distilled_folder, **info))
            save()
        if variant == "width" and not args.no_lora:
            seconds = args.lora_seconds or rows[-1]["recovery_seconds"]
            merged, info = _lora_for(seconds, pruned, tokenizer, args, out / "width-lora")
            rows.append(_row("width + LoRA (same time)", merged, tokenizer, texts, args, out / "width-lora", **info))
            save()
    _gains(rows)
    results_file = save()
    _plot(rows, results_file.with_name(results_file.stem + "-curve.png"))


def _recipe(variant: str, args: argparse.Namespace, model, width_removed: int | None):
    """The width recipe as asked; depth removing as many parameters as width did (equal parameter count)."""
    from pruning_core.recipe import Recipe
    from pruning_core.structured.llm_pruner import counted_parameters

    common = {"calibration_samples": args.samples, "seq_len": args.seq_len}
    if variant == "width":
        return Recipe(method="llm_pruner", ratio=args.ratio, ratio_of=args.ratio_of, **common)
    ratio = args.ratio if width_removed is None else width_removed / counted_parameters(model, args.ratio_of)
    return Recipe(method="depth", ratio=ratio, ratio_of=args.ratio_of, **common)


def _gains(rows: list[dict]) -> None:
    """x dense beside each row that was timed: tokens/s ratios, size and parameters dense / variant."""
    dense = rows[0]
    for row in rows[1:]:
        if "speed" in row:
            row["gain"] = {key: value / dense["speed"][key] for key, value in row["speed"].items() if "tok_s" in key}
        row["ppl_x_dense"] = {k: row[k] / dense[k] for k in row if k.startswith("ppl.")}
        row["parameters_x_dense"] = dense["parameters"] / row["parameters"]


if __name__ == "__main__":
    main()
