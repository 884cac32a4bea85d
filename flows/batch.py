"""The Prefect flows: `compress_batch` runs a batch's models x recipes, here or on a work pool, as `compress_model`
runs (one pair each, `flows.pair_stages`), after a `prepare_model` run per model on a pool.

The batch's steps: start (the MLflow parent run, the run record), run the pairs, run the sparsity searches,
finish (summary, review, what ships).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.batch_config import BatchConfig, BatchRecipe
from flows.pair_stages import PairStages, compress_pair, flow_settings
from flows.pairs import PairRequest, PairResult, progress_line, summary_table
from flows.pool import run_on_pool
from flows.run_records import RunRecord, save_record
from flows.search import SearchOutcome, probe_name, run_searches, search_of
from infra.preflight import check_services
from infra.redact import install_log_redaction, redact
from infra.settings import Settings, prepare_environment
from pruning_core.recipe import Recipe
from tasks.calibrate import CalibrationSpec
from tasks.evaluate import EvaluationSpec
from tasks.review import SELECTION_PARAM
from tasks.track import finish_batch_run, judge_probe, record_failed_pair, start_batch_run


class PairsFailed(RuntimeError):
    pass


@flow(name="compress-model", flow_run_name="{recipe_name}")
def compress_model(
    model: str,
    recipe: Recipe,
    calibration: CalibrationSpec,
    evaluation: EvaluationSpec,
    *,
    recipe_name: str = "recipe",
    parent_run_id: str | None = None,
    experiment: str = "secateur",
) -> PairResult:
    """One pair (`flows.pair_stages.compress_pair`). Run from its pool deployment, it beats a heartbeat into the store
    and leaves its result there."""
    request = PairRequest(
        model=model,
        recipe=recipe,
        calibration=calibration,
        evaluation=evaluation,
        recipe_name=recipe_name,
        parent_run_id=parent_run_id,
        experiment=experiment,
    )
    with flow_settings() as settings:
        return compress_pair(settings, request)


@flow(name="prepare-model", flow_run_name="prepare")
def prepare_model(model: str, calibration: CalibrationSpec, evaluation: EvaluationSpec) -> None:
    """On a pool, before a model's pairs: fetch, calibration and dense evaluation once, shared via the store."""
    with flow_settings() as settings:
        PairStages(settings).prepare(model, calibration, evaluation)


def _error_line(state) -> str:
    error = state.result(raise_on_failure=False)
    text = str(error) if isinstance(error, BaseException) else (state.message or state.name)
    return redact(" ".join(text.split()))


def _run_here(request: PairRequest) -> PairResult:
    state = compress_model(**dict(request), return_state=True)
    if state.is_completed():
        return state.result()
    return PairResult.failed(request, _error_line(state))


@dataclass
class _BatchRun:
    """One run of a batch: where its pairs run, its MLflow parent run and its run record."""

    batch: BatchConfig
    settings: Settings
    pool: str | None
    parent: str  # the MLflow run of the batch
    record: RunRecord
    expected: int = 0  # pairs and search probes it will run
    results: list[PairResult] = field(default_factory=list)

    def request(self, model: str, entry: BatchRecipe, sparsity: float | None = None) -> PairRequest:
        return PairRequest(
            model=model,
            recipe=entry.recipe(self.batch.calibration, sparsity),
            calibration=self.batch.calibration,
            evaluation=self.batch.evaluation,
            recipe_name=entry.name if sparsity is None else probe_name(entry.name, sparsity),
            parent_run_id=self.parent,
            experiment=self.batch.name,
        )

    def on_result(self, result: PairResult) -> None:
        """A pair is over: a failure recorded in MLflow, the run record saved, a progress line printed."""
        logger = get_run_logger()
        if result.status == "failed":
            logger.error("%s x %s failed: %s", result.model, result.recipe_name, result.error)
            noted = record_failed_pair(
                self.settings,
                self.batch.name,
                self.parent,
                result.model,
                result.recipe_name,
                result.error or "",
                return_state=True,
            )
            if not noted.is_completed():  # MLflow gone: the pair stays in the run record and the summary
                logger.warning(
                    "%s x %s: not recorded in MLflow: %s", result.model, result.recipe_name, _error_line(noted)
                )
        self.record.results.append(result)
        save_record(self.settings, self.record)
        print(f"[{len(self.record.results)}/{self.expected}] {progress_line(result)}", flush=True)

    def run_pairs(self, requests: list[PairRequest]) -> list[PairResult]:
        if self.pool:
            return run_on_pool(self.pool, requests, self.settings, self.on_result)
        done = []
        for request in requests:
            done.append(_run_here(request))
            self.on_result(done[-1])
        return done


def _start(
    batch: BatchConfig, config: dict, settings: Settings, *, pool: str | None, only: list[list[str]] | None
) -> tuple[_BatchRun, list[PairRequest], list[tuple[str, BatchRecipe]]]:
    """The batch's MLflow parent run, its pairs and searches (those `only` names), and its run record, saved
    (a crashed batch can be retried from any machine)."""
    run_id, run_name = str(flow_run.get_id() or "local"), flow_run.get_name() or batch.name
    parent = start_batch_run(
        settings,
        batch.name,
        f"{batch.name}/{run_name}",
        params={
            "batch": batch.name,
            "models": ",".join(batch.models),
            "recipes": ",".join(r.name for r in batch.recipes),
            "calibration": batch.calibration.model_dump(mode="json"),
            "evaluation": batch.evaluation.model_dump(mode="json"),
            "pool": pool or "",
            # one JSON param (not flattened): `secateur report` reads the budget back from it
            SELECTION_PARAM: batch.selection.model_dump_json() if batch.selection else "",
        },
        tags={"prefect_flow_run_id": run_id, "prefect_flow_run_name": run_name, "batch": batch.name},
    )
    record = RunRecord(
        flow_run_id=run_id,
        flow_run_name=run_name,
        batch=batch.name,
        config=config,
        mlflow_run_id=parent,
        pool=pool,
        pairs=[],
    )
    run = _BatchRun(batch=batch, settings=settings, pool=pool, parent=parent, record=record)
    # A retry names probes of a search by their own names: it reruns the search (its done probes are cached).
    wanted = {(model, search_of(name)) for model, name in only} if only else None
    pairs = [run.request(m, entry) for m, entry in batch.pairs() if wanted is None or (m, entry.name) in wanted]
    searches = [(m, entry) for m, entry in batch.searches() if wanted is None or (m, entry.name) in wanted]
    record.pairs = [(r.model, r.recipe_name) for r in pairs] + [(m, entry.name) for m, entry in searches]
    save_record(settings, record)
    run.expected = len(pairs) + sum(entry.search.steps for _, entry in searches if entry.search)
    return run, pairs, searches


def _searches(run: _BatchRun, searches: list[tuple[str, BatchRecipe]]) -> tuple[list[PairResult], list[SearchOutcome]]:
    """Each search's probes (pairs at bisected sparsities), judged against the batch's budget."""
    if not searches or run.batch.selection is None:
        return [], []
    spec = run.batch.selection.with_dataset(list(run.batch.evaluation.datasets()))
    probes, outcomes = run_searches(
        searches, run.request, run.run_pairs, lambda result: judge_probe(run.settings, result.mlflow_run_id, spec)
    )
    for outcome in outcomes:
        get_run_logger().info("search %s", outcome.describe())
        print(f"search {outcome.describe()}", flush=True)
    run.record.searched = [(o.model, o.recipe_name) for o in outcomes if o.error is None]
    return probes, outcomes


def _finish(run: _BatchRun, results: list[PairResult], outcomes: list[SearchOutcome]) -> list[PairResult]:
    """Summary, review and what ships in the parent run; raises when a pair failed or MLflow did not finish."""
    logger = get_run_logger()
    table = summary_table(results)
    logger.info("batch %s summary:\n%s", run.batch.name, table)
    failed = [r for r in results if r.status == "failed"]
    save_record(run.settings, run.record.model_copy(update={"results": results, "finished": True}))
    generations = {f"{Path(r.model).name} x {r.recipe_name}": r.generations for r in results if r.generations}
    finished = finish_batch_run(
        run.settings,
        run.parent,
        summary=table,
        metrics={"pairs": len(results), "pairs_failed": len(failed)},
        failed=bool(failed),
        generations=generations,
        searches=outcomes,
        return_state=True,
    )
    for line in finished.result() if finished.is_completed() else []:
        logger.info("%s", line)
        print(line, flush=True)
    if failed:
        names = "; ".join(f"{Path(r.model).name} x {r.recipe_name}: {r.error}" for r in failed)
        raise PairsFailed(f"{len(failed)} of {len(results)} pairs failed: {names}")
    if not finished.is_completed():
        raise PairsFailed(f"every pair completed, but the batch's MLflow run was not finished: {_error_line(finished)}")
    return results


@flow(name="compress-batch", flow_run_name="{config[name]}")
def compress_batch(config: dict, only: list[list[str]] | None = None, pool: str | None = None) -> list[PairResult]:
    """Every model x recipe of a batch; one failing pair does not stop the others.

    `only` restricts the run to [model, recipe name] pairs (what `secateur retry` passes). With a `pool`,
    each pair is a flow run of the `compress-model` deployment on that work pool; without, they run here.
    """
    install_log_redaction()  # in whatever process runs the flow (a worker's too)
    batch = BatchConfig.model_validate(config)
    settings = Settings()
    prepare_environment(settings)
    check_services(settings)  # an unreachable store or MLflow stops the batch before any work
    run, pairs, searches = _start(batch, config, settings, pool=pool, only=only)
    results = run.run_pairs(pairs)
    probes, outcomes = _searches(run, searches)
    return _finish(run, results + probes, outcomes)
