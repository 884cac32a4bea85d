"""The metrics of a published pair: their MLflow names, what they mean, how they are written and read back.

Each pair run logs its own evaluation and, under `dense_`, its model's dense evaluation (so that a review
needs no other run); `publish` writes them with `pair_metrics`, and review, selection and registration read
them through `measured` and the names here (selection compares the `acc.<task>` keys `measured` makes).

    ppl.<dataset>                      perplexity of the variant on a dataset (its label)
    acc.<task>, acc_norm.<task>        lm-eval zero-shot accuracy (and their _stderr)
    speed.<measure>.b<batch>           prefill/decode tokens per second, ms per token, 2:4 kernel ratios
    params.{total,decoder,embeddings}  parameters as loaded; loaded_mib: their bytes
    gain.<measure>                     the variant x dense (above 1 it gains)
    sparsity, model_size_mib, dense_size_mib, peak_rss_mib, peak_gpu_mib, resumed_from_block
    recovery.*                         recovery training (steps, final loss, held-out perplexity)
    seconds.<stage>                    compute time of each stage
    dense_*, before_recovery_*         the same evaluation names, of the dense model / before recovery
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from pruning_core.footprint import gains
from tasks.evaluate import Evaluation

if TYPE_CHECKING:
    from tasks.publish import PairRecord

PERPLEXITY, SPEED, GAIN, SECONDS = "ppl.", "speed.", "gain.", "seconds."
ACCURACIES = ("acc.", "acc_norm.")
SPARSE_RATIO = "semi_structured_ratio."  # a speed: with the 2:4 sparse kernels / with the dense ones
DENSE_PREFIX, BEFORE_RECOVERY_PREFIX = "dense_", "before_recovery_"
SPARSITY, SIZE, DENSE_SIZE = "sparsity", "model_size_mib", "dense_size_mib"
PARAMETERS, LOADED = "params.total", "loaded_mib"
LOADS_WITH_FROM_PRETRAINED = "loads_with_from_pretrained"  # structured: 1.0 when stock transformers loads it
BLOCK_ERROR = "block_error"  # a series: the mean relative reconstruction error of each block
# What a registered version carries as tags (metric names, or their prefixes).
VERSION_TAGS = (SPARSITY, SIZE, PERPLEXITY, *ACCURACIES, SPEED)


def folder_mib(path: str | Path) -> float:
    """Size on disk of a model folder (or a single file such as a .gguf), in MiB."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def evaluation_metrics(evaluation: Evaluation, prefix: str = "") -> dict[str, float]:
    """ppl.<dataset>, acc.<task>, acc_norm.<task> (and their stderr), speed.<measure>.b<batch>,
    params.{total,decoder,embeddings} and loaded_mib, each under `prefix`."""
    metrics = {f"{prefix}{PERPLEXITY}{label}": value for label, value in evaluation.perplexity.items()}
    metrics.update({f"{prefix}{SPEED}{key}": value for key, value in evaluation.speed.items()})
    for name, accuracy in evaluation.zero_shot.items():
        metrics.update({f"{prefix}{metric}.{name}": value for metric, value in accuracy.metrics.items()})
    if evaluation.footprint is not None:
        metrics.update({f"{prefix}{key}": value for key, value in evaluation.footprint.metrics().items()})
    return metrics


def gain_measures(evaluation: Evaluation, size_mib: float) -> dict[str, float]:
    """What a gain over dense is computed from, by unprefixed name: size on disk, footprint, throughputs."""
    measures = {"size_mib": size_mib, **evaluation.speed}
    if evaluation.footprint is not None:
        measures.update(evaluation.footprint.metrics())
    return measures


def gain_metrics(evaluation: Evaluation, dense: Evaluation, size_mib: float, dense_size_mib: float) -> dict[str, float]:
    """gain.<measure>: the variant x dense (above 1 it gains), e.g. gain.decode_tok_s.b1 (variant / dense),
    gain.size_mib, gain.loaded_mib and gain.params.total (dense / variant)."""
    measured = gains(gain_measures(evaluation, size_mib), gain_measures(dense, dense_size_mib))
    return {f"{GAIN}{key}": value for key, value in measured.items()}


def _recovery_metrics(record: PairRecord) -> dict[str, float]:
    recovered = record.recovered
    if recovered is None:
        return {}
    metrics = {
        "recovery.steps": float(recovered.steps),
        "recovery.final_loss": recovered.losses[-1],
        "recovery.resumed_from_step": float(recovered.resumed_from_step),
        "recovery.seconds": recovered.seconds,
    }
    if recovered.heldout:
        metrics["recovery.heldout_ppl_before"] = recovered.heldout.get(0, float("nan"))
        metrics["recovery.heldout_ppl"] = recovered.heldout[max(recovered.heldout)]
        metrics["recovery.tokens"] = float(recovered.tokens)
    return metrics


def pair_metrics(record: PairRecord) -> dict[str, float]:
    """Every metric a pair run logs."""
    size_mib = folder_mib(record.model_path)
    # A GGUF's file is quantized: the dense model's size is its weights as its variants store them.
    dense_size_mib = record.dense.weights_mib or folder_mib(record.snapshot.path)
    metrics = {
        SPARSITY: record.pruned.sparsity,
        "peak_rss_mib": record.pruned.peak_rss_mib,
        "resumed_from_block": float(record.pruned.resumed_from_block),
        SIZE: size_mib,
        DENSE_SIZE: dense_size_mib,
        **record.pruned.structure,
    }
    if record.pruned.peak_gpu_mib:
        metrics["peak_gpu_mib"] = record.pruned.peak_gpu_mib
    metrics.update(evaluation_metrics(record.evaluation))
    metrics.update(evaluation_metrics(record.dense, DENSE_PREFIX))
    metrics.update(gain_metrics(record.evaluation, record.dense, size_mib, dense_size_mib))
    if record.before_recovery is not None:
        metrics.update(evaluation_metrics(record.before_recovery, BEFORE_RECOVERY_PREFIX))
    metrics.update(_recovery_metrics(record))
    metrics.update({f"{SECONDS}{stage}": s for stage, s in record.stage_seconds.items()})
    return metrics


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """The metrics named `prefix<key>`, by key."""
    return {key.removeprefix(prefix): value for key, value in metrics.items() if key.startswith(prefix)}


class Measured(BaseModel):
    """One evaluation as a pair run logged it, read back (the variant's, or under `dense_` its dense model's)."""

    perplexity: dict[str, float]
    accuracy: dict[str, float]  # "acc.piqa", "acc_norm.piqa", ...
    speed: dict[str, float]
    parameters: float | None
    loaded_mib: float | None


def measured(metrics: dict[str, float], prefix: str = "") -> Measured:
    accuracy = {}
    for metric in ACCURACIES:
        accuracy.update({f"{metric}{task}": v for task, v in prefixed(metrics, prefix + metric).items()})
    return Measured(
        perplexity=prefixed(metrics, prefix + PERPLEXITY),
        accuracy=accuracy,
        speed=prefixed(metrics, prefix + SPEED),
        parameters=metrics.get(prefix + PARAMETERS),
        loaded_mib=metrics.get(prefix + LOADED),
    )
