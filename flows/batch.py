"""The Prefect flows: `compress_model` for one (model, recipe), `compress_batch` for models x recipes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.batch_config import BatchConfig
from infra.durable import write_atomic
from infra.preflight import check_services
from infra.redact import install_log_redaction, redact
from infra.settings import Settings
from pruning_core.recipe import Recipe
from tasks.calibrate import CalibrationSpec, build_calibration
from tasks.common import retried, stored
from tasks.evaluate import EvaluationSpec, evaluate
from tasks.fetch import fetch_model
from tasks.prune import prune
from tasks.publish import PairRecord, generations_text, publish
from tasks.recover import recover
from tasks.track import finish_batch_run, record_failed_pair, start_batch_run


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


class PairsFailed(RuntimeError):
    pass


class _Stages:
    """Runs the tasks of one pair, remembering each one's Prefect state and compute time."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def run(self, stage: str, task, *args):
        started = time.perf_counter()
        get_run_logger().info("stage %s started", stage)  # the log file shows where a run was
        state = task(*args, return_state=True)
        value = state.result()
        if state.name == "Cached" and not Path(getattr(value, "path", "/")).exists():
            # The cache points at files someone deleted: compute again and refresh the cache entry.
            state = task.with_options(refresh_cache=True)(*args, return_state=True)
            value = state.result()
        self.states[stage] = state.name
        # A cached result keeps the time its computation took; fetch and publish are timed here.
        computed = getattr(value, "seconds", None) or getattr(value, "prune_seconds", None)
        self.seconds[stage] = computed or time.perf_counter() - started
        return value


@flow(name="compress-model", flow_run_name="{recipe_name}")
def compress_model(
    model: str,
    recipe: Recipe,
    calibration: CalibrationSpec,
    evaluation: EvaluationSpec,
    recipe_name: str = "recipe",
    parent_run_id: str | None = None,
    experiment: str = "secateur",
) -> PairResult:
    """fetch -> calibrate -> dense baseline -> prune (checkpointed) [-> recover] -> evaluate -> publish.

    With a recovery (structured recipes), the pruned model's perplexity is measured before it too.
    """
    settings = Settings()
    stages = _Stages()
    snapshot = stages.run("fetch", retried(fetch_model, settings), model)
    calibration_set = stages.run("calibrate", stored(build_calibration, settings), snapshot, calibration)
    evaluate_task = stored(evaluate, settings)
    dense = stages.run("evaluate_dense", evaluate_task, snapshot.path, snapshot.fingerprint, evaluation)
    # Recipes that differ only in their recovery share one prune.
    pruned = stages.run("prune", stored(prune, settings), snapshot, calibration_set, recipe.without_recovery())
    recovered = before_recovery = None
    final_path, final_fingerprint = pruned.path, pruned.fingerprint
    if recipe.recovery is not None:
        before_spec = evaluation.perplexity_only()
        if before_spec is not None:
            before_recovery = stages.run(
                "evaluate_before_recovery", evaluate_task, pruned.path, pruned.fingerprint, before_spec
            )
        recovered = stages.run("recover", stored(recover, settings), pruned, recipe.recovery)
        final_path, final_fingerprint = recovered.path, recovered.fingerprint
    result = stages.run("evaluate", evaluate_task, final_path, final_fingerprint, evaluation)
    record = PairRecord(
        recipe_name=recipe_name,
        recipe=recipe,
        snapshot=snapshot,
        calibration=calibration,
        calibration_fingerprint=calibration_set.fingerprint,
        pruned=pruned,
        evaluation=result,
        dense=dense,
        recovered=recovered,
        before_recovery=before_recovery,
        stage_seconds=stages.seconds,
    )
    get_run_logger().info("stage publish started")
    publication = retried(publish, settings)(record, parent_run_id, experiment)
    return PairResult(
        model=model,
        recipe_name=recipe_name,
        status="completed",
        sparsity=pruned.sparsity,
        perplexity=result.perplexity,
        dense_perplexity=dense.perplexity,
        generations=generations_text(dense.generations, result.generations, recipe_name) or None,
        prune_seconds=pruned.prune_seconds,
        model_uri=publication.model_uri,
        mlflow_run_id=publication.mlflow_run_id,
        task_states=stages.states,
        stage_seconds=stages.seconds,
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
            f"{prune_cell:>8}  {(r.error or '')[:120]}"
        )
    return "\n".join(lines)


def progress_line(result: PairResult) -> str:
    name = f"{Path(result.model).name} x {result.recipe_name}"
    if result.status == "failed":
        return f"{name}: failed ({result.error})"
    ppl = ", ".join(f"ppl {label} {value:.2f}" for label, value in result.perplexity.items())
    return f"{name}: {result.status}, sparsity {result.sparsity or 0:.3f}" + (f", {ppl}" if ppl else "")


def _error_line(state) -> str:
    error = state.result(raise_on_failure=False)
    text = str(error) if isinstance(error, BaseException) else (state.message or state.name)
    return redact(" ".join(text.split()))


def run_record_path(settings: Settings, run_id: str) -> Path:
    return settings.path("runs") / f"{run_id}.json"


@flow(name="compress-batch", flow_run_name="{config[name]}")
def compress_batch(config: dict, only: list[list[str]] | None = None) -> list[PairResult]:
    """Every model x recipe of a batch; one failing pair does not stop the others.

    `only` restricts the run to [model, recipe name] pairs (what `secateur retry` passes).
    """
    install_log_redaction()  # in whatever process runs the flow (a worker's too)
    batch = BatchConfig.model_validate(config)
    settings = Settings()
    check_services(settings)  # an unreachable store or MLflow stops the batch before any work
    logger = get_run_logger()
    run_id, run_name = str(flow_run.get_id() or "local"), flow_run.get_name() or batch.name
    parent = start_batch_run(
        batch.name,
        f"{batch.name}/{run_name}",
        params={
            "batch": batch.name,
            "models": ",".join(batch.models),
            "recipes": ",".join(r.name for r in batch.recipes),
            "calibration": batch.calibration.model_dump(mode="json"),
            "evaluation": batch.evaluation.model_dump(mode="json"),
        },
        tags={"prefect_flow_run_id": run_id, "prefect_flow_run_name": run_name, "batch": batch.name},
    )
    wanted = {tuple(pair) for pair in only} if only else None
    pairs = [(m, e) for m, e in batch.pairs() if wanted is None or (m, e.name) in wanted]
    results: list[PairResult] = []
    for number, (model, entry) in enumerate(pairs, 1):
        state = compress_model(
            model,
            entry.recipe(batch.calibration),
            batch.calibration,
            batch.evaluation,
            entry.name,
            parent,
            batch.name,
            return_state=True,
        )
        if state.is_completed():
            results.append(state.result())
        else:
            error = _error_line(state)
            logger.error("%s x %s failed: %s", model, entry.name, error)
            record_failed_pair(batch.name, parent, model, entry.name, error)
            results.append(PairResult(model=model, recipe_name=entry.name, status="failed", error=error))
        print(f"[{number}/{len(pairs)}] {progress_line(results[-1])}", flush=True)
    table = summary_table(results)
    logger.info("batch %s summary:\n%s", batch.name, table)
    failed = [r for r in results if r.status == "failed"]
    record = {
        "flow_run_id": run_id,
        "flow_run_name": run_name,
        "batch": batch.name,
        "config": config,
        "mlflow_run_id": parent,
        "results": [r.model_dump() for r in results],
    }
    write_atomic(run_record_path(settings, run_id), json.dumps(record, indent=2))
    generations = {f"{Path(r.model).name} x {r.recipe_name}": r.generations for r in results if r.generations}
    finish_batch_run(parent, table, {"pairs": len(results), "pairs_failed": len(failed)}, bool(failed), generations)
    if failed:
        names = "; ".join(f"{Path(r.model).name} x {r.recipe_name}: {r.error}" for r in failed)
        raise PairsFailed(f"{len(failed)} of {len(results)} pairs failed: {names}")
    return results
