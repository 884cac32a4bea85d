"""One (model, recipe) pair of a batch: what runs it (a request) and what it gave (a result), as typed data."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from pruning_core.recipe import Recipe
from tasks.calibrate import CalibrationSpec
from tasks.evaluate import EvaluationSpec


class PairRequest(BaseModel):
    """The parameters of one `compress-model` run, in process or on a pool."""

    model: str
    recipe: Recipe
    calibration: CalibrationSpec
    evaluation: EvaluationSpec
    recipe_name: str = "recipe"
    parent_run_id: str | None = None
    experiment: str = "secateur"


class PairResult(BaseModel):
    model: str
    recipe_name: str
    status: str  # completed | failed
    error: str | None = None
    sparsity: float | None = None
    perplexity: dict[str, float] = {}
    dense_perplexity: dict[str, float] = {}
    generations: str | None = None  # dense and pruned continuations of the sanity prompts
    prune_seconds: float | None = None
    model_uri: str | None = None
    mlflow_run_id: str | None = None
    task_states: dict[str, str] = {}  # task -> Prefect state name (Completed, Cached, ...)
    stage_seconds: dict[str, float] = {}  # task -> seconds it took when it was computed
    worker: str | None = None  # host and state dir of the process that ran it
    attempts: int = 1  # runs of the pair on a pool (a lost worker's pair runs again)

    @classmethod
    def failed(cls, request: PairRequest, error: str, attempts: int = 1) -> PairResult:
        return cls(
            model=request.model, recipe_name=request.recipe_name, status="failed", error=error, attempts=attempts
        )


def summary_table(results: list[PairResult]) -> str:
    labels = sorted({label for r in results for label in r.perplexity})
    width = max([len(Path(r.model).name) for r in results] + [5])
    header = (
        f"{'model':<{width}} {'recipe':<14} {'status':<9} {'sparsity':>8} "
        + " ".join(f"{'ppl ' + label:>18} {'dense':>8}" for label in labels)
        + f" {'prune':>8}  error"
    )
    lines = [header]
    for r in results:
        cells = " ".join(
            f"{r.perplexity.get(label, float('nan')):>18.2f} {r.dense_perplexity.get(label, float('nan')):>8.2f}"
            for label in labels
        )
        sparsity = f"{r.sparsity:>8.3f}" if r.sparsity is not None else f"{'-':>8}"
        prune_cell = r.task_states.get("prune", "-")
        lines.append(
            f"{Path(r.model).name:<{width}} {r.recipe_name:<14} {r.status:<9} {sparsity} {cells} "
            f"{prune_cell:>8}  {(r.error or '')[:120]}" + (f" ({r.attempts} attempts)" if r.attempts > 1 else "")
        )
    return "\n".join(lines)


def progress_line(result: PairResult) -> str:
    name = f"{Path(result.model).name} x {result.recipe_name}"
    if result.status == "failed":
        return f"{name}: failed ({result.error})"
    ppl = ", ".join(f"ppl {label} {value:.2f}" for label, value in result.perplexity.items())
    return f"{name}: {result.status}, sparsity {result.sparsity or 0:.3f}" + (f", {ppl}" if ppl else "")
