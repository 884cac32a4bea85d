"""Review of a batch, read back from MLflow: the model x recipe table (with deltas against dense),
its CSV/markdown renderings, and the plots logged with the batch run."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from pydantic import BaseModel, Field

from infra.plots import bar_plot, line_plot, scatter_plot
from infra.tracking import Tracker
from pruning_core.footprint import THROUGHPUT
from pruning_core.methods import METHODS, STRUCTURED_METHODS
from tasks.metrics import (
    BLOCK_ERROR,
    DENSE_PREFIX,
    DENSE_SIZE,
    GAIN,
    LOADS_WITH_FROM_PRETRAINED,
    SECONDS,
    SIZE,
    SPARSE_RATIO,
    SPARSITY,
    measured,
    prefixed,
)
from tasks.selection import ModelChoice, SelectionSpec, Variant, Verdict, choose, describe_choice, judge

FORMATS = ("table", "csv", "markdown")
DENSE = "dense"
SELECTION_PARAM = "selection"  # the batch run's param holding its selection spec (JSON)
SIZE_GAIN = "size_mib"  # the gain shown first: size on disk, dense / variant
ZEROS_GAIN_NOTHING = (
    "zeros gain no speed or size with the runtimes in use today: an unstructured or N:M variant keeps dense "
    "tensors of the same shapes, dense kernels multiply its zeros, vLLM removed its 2:4 sparse support and "
    "torchao deleted its sparsity package; only structured variants (whole heads, channels or blocks "
    "removed) are really smaller and faster (the x dense columns)"
)


class ReportRow(Variant):
    """One variant of the batch (or a model's dense row), as its MLflow run recorded it."""

    model: str
    method: str
    prune_seconds: float | None = None
    loaded_mib: float | None = None  # parameters and buffers as the evaluation loaded them
    gain: dict[str, float] = Field(default_factory=dict)  # x dense as logged: size_mib, decode_tok_s.b1, ...
    secateur_only: bool = False  # a structured folder with per-block widths: stock runtimes cannot load it
    block_errors: list[float] = Field(default_factory=list)


class BatchReport(BaseModel):
    batch: str
    run_id: str
    rows: list[ReportRow]  # per model: its dense row, then its recipes
    task_splits: dict[str, str] = {}  # task -> "validation, 200 items" as the evaluations logged it
    seq_lens: dict[str, str] = {}  # perplexity dataset -> seq_len
    selection: SelectionSpec | None = None  # the batch's budget and objective, when it has one

    def choices(self) -> list[ModelChoice]:
        """Per model, the variant that ships under the batch's selection (none without a selection)."""
        if self.selection is None:
            return []
        spec = self.selection.with_dataset(self.datasets())
        choices = []
        for model in dict.fromkeys(r.model for r in self.rows):
            variants = [r for r in self.rows if r.model == model and r.recipe != DENSE]
            dense = self.dense_of(model)
            if dense is None:  # no pair finished: nothing to compare with
                choices.append(choose(model, ReportRow(model=model, recipe=DENSE, method=DENSE), [], spec))
            else:
                choices.append(choose(model, dense, variants, spec))
        return choices

    def speed_keys(self) -> list[str]:
        """The throughputs measured (prefill_tok_s.b8, decode_tok_s.b1), then the 2:4 kernels' ratios to them."""
        wanted = ("prefill_tok_s.", "decode_tok_s.", f"{SPARSE_RATIO}prefill_tok_s.", f"{SPARSE_RATIO}decode_tok_s.")
        keys = {key for row in self.rows for key in row.speed if key.startswith(wanted)}
        return sorted(keys, key=lambda k: (k.startswith(SPARSE_RATIO), k.split(".")[-2], int(k.rsplit(".b", 1)[1])))

    def gain_keys(self) -> list[str]:
        """The gains over dense shown: size on disk, then each throughput in the order of speed_keys."""
        speed = [key for key in self.speed_keys() if not key.startswith(SPARSE_RATIO)]
        logged = {key for row in self.rows for key in row.gain}
        return [key for key in [SIZE_GAIN, *speed] if key in logged]

    def datasets(self) -> list[str]:
        return sorted({label for row in self.rows for label in row.perplexity})

    def accuracy_keys(self) -> list[str]:
        return sorted({key for row in self.rows for key in row.accuracy}, key=lambda k: (k.split(".", 1)[1], k))

    def dense_of(self, model: str) -> ReportRow | None:
        return next((r for r in self.rows if r.model == model and r.recipe == DENSE), None)


def _rows_of(tracker: Tracker, run) -> tuple[ReportRow | None, ReportRow]:
    """A pair run's row, and its model's dense row (from the dense metrics it logged, when it finished)."""
    metrics, params = run.data.metrics, run.data.params
    model = params.get("model", run.info.run_name.split("/")[0])
    dense = None
    if DENSE_SIZE in metrics:
        dense = ReportRow(
            model=model,
            recipe=DENSE,
            method=DENSE,
            status="FINISHED",
            size_mib=metrics[DENSE_SIZE],
            dtype=params.get("dense_dtype"),
            **measured(metrics, DENSE_PREFIX).model_dump(),
        )
    row = ReportRow(
        model=model,
        recipe=params.get("recipe_name", run.data.tags.get("recipe", "?")),
        method=params.get("recipe.method", "?"),
        status=run.info.status,
        sparsity=metrics.get(SPARSITY),
        prune_seconds=metrics.get(f"{SECONDS}prune"),
        size_mib=metrics.get(SIZE),
        dtype=params.get("dtype"),
        gain=prefixed(metrics, GAIN),
        secateur_only=metrics.get(LOADS_WITH_FROM_PRETRAINED) == 0.0,
        run_id=run.info.run_id,
        block_errors=tracker.series(run.info.run_id, BLOCK_ERROR) if BLOCK_ERROR in metrics else [],
        **measured(metrics).model_dump(),
    )
    return dense, row


def pair_verdict(tracker: Tracker, run_id: str, spec: SelectionSpec) -> Verdict:
    """A finished pair run judged against a budget (a sparsity search's probe)."""
    dense, row = _rows_of(tracker, tracker.client.get_run(run_id))
    if dense is None:
        return Verdict(recipe=row.recipe, run_id=run_id, problem="no dense evaluation logged")
    return judge(row, dense, spec)


def batch_report(tracker: Tracker, ref: str) -> BatchReport:
    parent = tracker.find_batch_run(ref)
    rows: list[ReportRow] = []
    dense_rows: dict[str, ReportRow] = {}
    splits: dict[str, str] = {}
    seq_lens: dict[str, str] = {}
    for run in tracker.child_runs(parent):
        params = run.data.params
        for key, value in params.items():
            if key.startswith("evaluation.split."):
                task = key.removeprefix("evaluation.split.")
                splits[task] = f"{value}, {params.get(f'evaluation.items.{task}', '?')} items"
            elif key.startswith("evaluation.seq_len."):
                seq_lens[key.removeprefix("evaluation.seq_len.")] = value
        dense, row = _rows_of(tracker, run)
        if dense is not None:
            dense_rows.setdefault(row.model, dense)
        rows.append(row)
    ordered = []
    for model in dict.fromkeys(r.model for r in rows):
        if model in dense_rows:
            ordered.append(dense_rows[model])
        ordered.extend(r for r in rows if r.model == model)
    batch = parent.data.tags.get("batch", parent.info.run_name)
    selection = parent.data.params.get(SELECTION_PARAM)
    return BatchReport(
        batch=batch,
        run_id=parent.info.run_id,
        rows=ordered,
        task_splits=splits,
        seq_lens=seq_lens,
        selection=SelectionSpec.model_validate_json(selection) if selection else None,
    )


# --- rendering ---


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _with_delta(value: float | None, dense: float | None, digits: int, is_dense: bool) -> str:
    if value is None:
        return "-"
    if is_dense or dense is None:
        return _number(value, digits)
    return f"{value:.{digits}f} ({value - dense:+.{digits}f})"


def _speed_header(key: str) -> str:
    """prefill_tok_s.b8 -> 'prefill tok/s b8'; semi_structured_ratio.decode_tok_s.b1 -> '2:4 kernels x decode b1'."""
    if key.startswith(SPARSE_RATIO):
        measure, batch = key.removeprefix(SPARSE_RATIO).split("_tok_s.")
        return f"2:4 kernels x {measure} {batch}"
    return key.replace("_tok_s.", " tok/s ")


def _gain_header(key: str) -> str:
    """size_mib -> 'x dense size'; decode_tok_s.b1 -> 'x dense decode b1'."""
    return "x dense size" if key == SIZE_GAIN else "x dense " + key.replace(THROUGHPUT, " ")


def _millions(value: float | None) -> float | None:
    return None if value is None else value / 1e6


def _records(report: BatchReport, with_deltas: bool) -> tuple[list[str], list[list[str]]]:
    datasets, accuracy_keys, speed_keys = report.datasets(), report.accuracy_keys(), report.speed_keys()
    gain_keys = report.gain_keys()
    chosen = {(c.model, c.chosen) for c in report.choices()}
    header = ["model", "recipe", "status", "sparsity"]
    header += [f"ppl {d}" for d in datasets] + accuracy_keys
    header += ["prune s", "size MiB", "params M", "loaded MiB", "dtype"]
    header += [_speed_header(key) for key in speed_keys] + [_gain_header(key) for key in gain_keys]
    header += ["ships"] if report.selection is not None else []
    if not with_deltas:
        header += [f"delta ppl {d}" for d in datasets] + [f"delta {k}" for k in accuracy_keys]
    records = []
    for row in report.rows:
        dense = report.dense_of(row.model)
        is_dense = row.recipe == DENSE
        dense_ppl = dense.perplexity if dense else {}
        dense_acc = dense.accuracy if dense else {}
        if with_deltas:
            ppl = [_with_delta(row.perplexity.get(d), dense_ppl.get(d), 2, is_dense) for d in datasets]
            acc = [_with_delta(row.accuracy.get(k), dense_acc.get(k), 3, is_dense) for k in accuracy_keys]
        else:
            ppl = [_number(row.perplexity.get(d), 4) for d in datasets]
            acc = [_number(row.accuracy.get(k), 4) for k in accuracy_keys]
        record = [Path(row.model).name, row.recipe, row.status.lower(), _number(row.sparsity, 3), *ppl, *acc]
        record += [_number(row.prune_seconds, 1), _number(row.size_mib, 1), _number(_millions(row.parameters), 2)]
        record += [_number(row.loaded_mib, 1), row.dtype or "-"]
        record += [_number(row.speed.get(key), 2 if key.startswith(SPARSE_RATIO) else 1) for key in speed_keys]
        # dense shows its absolute numbers in the columns before; its gains over itself are blank
        record += ["" if is_dense else _number(row.gain.get(key), 2) for key in gain_keys]
        record += ["chosen" if (row.model, row.recipe) in chosen else ""] if report.selection is not None else []
        if not with_deltas:
            deltas = [row.perplexity.get(d, math.nan) - dense_ppl.get(d, math.nan) for d in datasets]
            deltas += [row.accuracy.get(k, math.nan) - dense_acc.get(k, math.nan) for k in accuracy_keys]
            record += ["" if is_dense else _number(v, 4) for v in deltas]
        records.append(record)
    return header, records


def render(report: BatchReport, fmt: str = "table") -> str:
    """The batch table: `table` (aligned text), `markdown`, or `csv` (deltas as their own columns)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "csv":
        header, records = _records(report, with_deltas=False)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(records)
        return buffer.getvalue()
    header, records = _records(report, with_deltas=True)
    title = f"batch {report.batch} (MLflow run {report.run_id}); deltas against dense in parentheses"
    notes = _notes(report)
    if fmt == "markdown":
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in records]
        return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"
    widths = [max(len(cell) for cell in column) for column in zip(header, *records, strict=False)]
    lines = [title] + [
        "  ".join(
            cell.rjust(w) if i >= 3 else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=False))
        )
        for r in [header, *records]
    ]
    return "\n".join(lines + notes) + "\n"


def _notes(report: BatchReport) -> list[str]:
    """Where the numbers come from: the seq_len of each perplexity, the split and item count of each task;
    the selection's budget and, per model, what ships or why nothing does."""
    notes = []
    if report.selection is not None:
        spec = report.selection.with_dataset(report.datasets())
        notes.append(f"selection: {spec.describe()}; objective {spec.objective}")
        notes += [f"ships: {describe_choice(choice)}" for choice in report.choices()]
    if report.seq_lens:
        notes.append("perplexity seq_len: " + ", ".join(f"{d} {n}" for d, n in sorted(report.seq_lens.items())))
    if report.task_splits:
        notes.append("tasks: " + "; ".join(f"{t} ({s})" for t, s in sorted(report.task_splits.items())))
    structured = sorted({r.method for r in report.rows if r.method in STRUCTURED_METHODS})
    if structured:
        notes.append(
            f"{', '.join(structured)}: sparsity = fraction of the parameters its ratio counts removed (the decoder's "
            "unless ratio_of: all), whole channels, heads or blocks: really smaller and faster"
        )
    secateur_only = sorted({r.recipe for r in report.rows if r.secateur_only})
    if secateur_only:
        notes.append(f"{', '.join(secateur_only)}: per-block widths, loads with secateur only (not stock runtimes)")
    zeroing = sorted({r.method for r in report.rows if r.method in METHODS})
    if zeroing:
        notes.append(f"{', '.join(zeroing)}: {ZEROS_GAIN_NOTHING}")
    if any(key.startswith(SPARSE_RATIO) for key in report.speed_keys()):
        notes.append("2:4 kernels x: PyTorch's own semi-structured kernels, measured here, not a serving runtime")
    if report.gain_keys():
        notes.append("x dense: gain over dense, above 1 a gain (tok/s variant / dense; size dense / variant)")
    if any(r.loaded_mib is not None for r in report.rows):
        notes.append("loaded MiB: parameters and buffers as evaluated (on a CPU in float32)")
    return notes


def write_plots(report: BatchReport, folder: Path) -> list[Path]:
    """Perplexity vs sparsity per method and model, per-block error per recipe, accuracy per task."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    finished = [r for r in report.rows if r.status == "FINISHED"]
    for dataset in report.datasets():
        groups: dict[str, list[tuple[float, float]]] = {}
        for row in finished:
            dense = report.dense_of(row.model)
            if row.recipe == DENSE or dataset not in row.perplexity or row.sparsity is None:
                continue
            points = groups.setdefault(f"{Path(row.model).name} / {row.method}", [])
            if dense and dataset in dense.perplexity and not points:
                points.append((0.0, dense.perplexity[dataset]))
            points.append((row.sparsity, row.perplexity[dataset]))
        if groups:
            paths.append(
                scatter_plot(
                    groups,
                    folder / f"perplexity_vs_sparsity.{dataset}.png",
                    f"{dataset}: perplexity vs sparsity",
                    "sparsity",
                    "perplexity",
                )
            )
    errors = {f"{Path(r.model).name} / {r.recipe}": r.block_errors for r in finished if r.block_errors}
    if errors:
        paths.append(
            line_plot(
                errors, folder / "block_errors.png", "reconstruction error per block", "block", "mean relative error"
            )
        )
    for model in dict.fromkeys(r.model for r in finished):
        rows = [r for r in finished if r.model == model and r.accuracy]
        keys = sorted({k for r in rows for k in r.accuracy if k.startswith("acc.")})
        if keys:
            groups = {r.recipe: [r.accuracy.get(k, 0.0) for k in keys] for r in rows}
            name = Path(model).name
            paths.append(
                bar_plot(
                    [k.removeprefix("acc.") for k in keys],
                    groups,
                    folder / f"accuracy.{name}.png",
                    f"{name}: zero-shot accuracy, dense vs pruned",
                    "accuracy",
                )
            )
    return paths


def write_review(report: BatchReport, folder: Path, generations: dict[str, str] | None = None) -> Path:
    """Everything logged with the batch run: the table in three formats, the plots, the generations."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.txt").write_text(render(report, "table"))
    (folder / "report.md").write_text(render(report, "markdown"))
    (folder / "report.csv").write_text(render(report, "csv"))
    write_plots(report, folder / "plots")
    if generations:
        text = "\n".join(f"## {pair}\n\n```\n{body}```\n" for pair, body in generations.items())
        (folder / "generations.md").write_text(text)
    return folder
