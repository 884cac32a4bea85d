"""The Prefect flows: `compress_model` for one (model, recipe), `compress_batch` for models x recipes."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.batch_config import BatchConfig, BatchRecipe
from flows.pairs import PairRequest, PairResult, progress_line, summary_table
from flows.pool import deployed_run_id, pool_run, pool_store, result_key, run_on_pool
from flows.run_records import RunRecord, save_record
from flows.search import SearchOutcome, probe_name, run_searches, search_of
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
from tasks.reuse import fetch_stored, intact, measured_identity
from tasks.review import SELECTION_PARAM
from tasks.track import finish_batch_run, judge_probe, record_failed_pair, start_batch_run


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
        if state.name == "Cached" and not intact(value) and not fetch_stored(value, Settings()):
            # The cache points at files that are gone or no longer the bytes that were made (and no store
            # holds them): compute again and refresh the entry.
            get_run_logger().warning("stage %s: the cached result's files are missing or altered; made again", stage)
            state = task.with_options(refresh_cache=True)(*args, return_state=True)
            value = state.result()
        self.states[stage] = state.name
        # A cached result keeps the time its computation took; fetch and publish are timed here.
        computed = getattr(value, "seconds", None) or getattr(value, "prune_seconds", None)
        self.seconds[stage] = computed or time.perf_counter() - started
        return value

    def prepare(self, settings: Settings, model: str, calibration: CalibrationSpec, evaluation: EvaluationSpec):
        """What every recipe of a model shares: its snapshot, calibration set and dense evaluation."""
        snapshot = self.run("fetch", retried(fetch_model, settings), model)
        calibration_set = self.run("calibrate", stored(build_calibration, settings), snapshot, calibration)
        dense = self.run("evaluate_dense", stored(evaluate, settings), snapshot.path, snapshot.fingerprint, evaluation)
        return snapshot, calibration_set, dense


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
    Run from its pool deployment, it beats a heartbeat into the store and leaves its result there.
    """
    settings = Settings()
    with pool_run(settings):
        result = _compress_pair(model, recipe, calibration, evaluation, recipe_name, parent_run_id, experiment)
    run_id = deployed_run_id()
    if run_id is not None:  # on a pool: the batch reads the result from the store
        pool_store(settings).write_text(result_key(run_id), result.model_dump_json())
    return result


@flow(name="prepare-model", flow_run_name="prepare")
def prepare_model(model: str, calibration: CalibrationSpec, evaluation: EvaluationSpec) -> None:
    """On a pool, before a model's pairs: fetch, calibration and dense evaluation once, shared via the store."""
    with pool_run(Settings()):
        # Read again inside: on a pool, pool_run turns on shared results (the Prefect records go to the store).
        _Stages().prepare(Settings(), model, calibration, evaluation)


def _compress_pair(
    model: str,
    recipe: Recipe,
    calibration: CalibrationSpec,
    evaluation: EvaluationSpec,
    recipe_name: str,
    parent_run_id: str | None,
    experiment: str,
) -> PairResult:
    settings = Settings()
    stages = _Stages()
    snapshot, calibration_set, dense = stages.prepare(settings, model, calibration, evaluation)
    evaluate_task = stored(evaluate, settings)
    # Recipes that differ only in their recovery share one prune.
    pruned = stages.run("prune", stored(prune, settings), snapshot, calibration_set, recipe.without_recovery())
    recovered = before_recovery = None
    final_path, final_fingerprint = pruned.path, measured_identity(pruned)
    if recipe.recovery is not None:
        before_spec = evaluation.perplexity_only()
        if before_spec is not None:
            before_recovery = stages.run(
                "evaluate_before_recovery", evaluate_task, pruned.path, measured_identity(pruned), before_spec
            )
        recovered = stages.run("recover", stored(recover, settings), pruned, recipe.recovery, snapshot)
        final_path, final_fingerprint = recovered.path, measured_identity(recovered)
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
        worker=f"{socket.gethostname()}:{settings.root}",
    )


def _error_line(state) -> str:
    error = state.result(raise_on_failure=False)
    text = str(error) if isinstance(error, BaseException) else (state.message or state.name)
    return redact(" ".join(text.split()))


def _run_here(request: PairRequest) -> PairResult:
    state = compress_model(**dict(request), return_state=True)
    if state.is_completed():
        return state.result()
    return PairResult.failed(request, _error_line(state))


@flow(name="compress-batch", flow_run_name="{config[name]}")
def compress_batch(config: dict, only: list[list[str]] | None = None, pool: str | None = None) -> list[PairResult]:
    """Every model x recipe of a batch; one failing pair does not stop the others.

    `only` restricts the run to [model, recipe name] pairs (what `secateur retry` passes). With a `pool`,
    each pair is a flow run of the `compress-model` deployment on that work pool; without, they run here.
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
            "pool": pool or "",
            # one JSON param (not flattened): `secateur report` reads the budget back from it
            SELECTION_PARAM: batch.selection.model_dump_json() if batch.selection else "",
        },
        tags={"prefect_flow_run_id": run_id, "prefect_flow_run_name": run_name, "batch": batch.name},
    )
    # A retry names probes of a search by their own names: it reruns the search (its done probes are cached).
    wanted = {(model, search_of(name)) for model, name in only} if only else None

    def make_request(model: str, entry: BatchRecipe, sparsity: float | None = None) -> PairRequest:
        return PairRequest(
            model=model,
            recipe=entry.recipe(batch.calibration, sparsity),
            calibration=batch.calibration,
            evaluation=batch.evaluation,
            recipe_name=entry.name if sparsity is None else probe_name(entry.name, sparsity),
            parent_run_id=parent,
            experiment=batch.name,
        )

    requests = [make_request(m, entry) for m, entry in batch.pairs() if wanted is None or (m, entry.name) in wanted]
    searches = [(m, entry) for m, entry in batch.searches() if wanted is None or (m, entry.name) in wanted]
    record = RunRecord(
        flow_run_id=run_id,
        flow_run_name=run_name,
        batch=batch.name,
        config=config,
        mlflow_run_id=parent,
        pool=pool,
        pairs=[(r.model, r.recipe_name) for r in requests] + [(m, entry.name) for m, entry in searches],
    )
    save_record(settings, record)  # a crashed batch can be retried from any machine
    expected = len(requests) + sum(entry.search.steps for _, entry in searches if entry.search)

    def on_result(result: PairResult) -> None:
        if result.status == "failed":
            logger.error("%s x %s failed: %s", result.model, result.recipe_name, result.error)
            noted = record_failed_pair(
                batch.name, parent, result.model, result.recipe_name, result.error or "", return_state=True
            )
            if not noted.is_completed():  # MLflow gone: the pair stays in the run record and the summary
                logger.warning(
                    "%s x %s: not recorded in MLflow: %s", result.model, result.recipe_name, _error_line(noted)
                )
        record.results.append(result)
        save_record(settings, record)
        print(f"[{len(record.results)}/{expected}] {progress_line(result)}", flush=True)

    def run_pairs(pair_requests: list[PairRequest]) -> list[PairResult]:
        if pool:
            return run_on_pool(pool, pair_requests, settings, on_result)
        done = []
        for request in pair_requests:
            done.append(_run_here(request))
            on_result(done[-1])
        return done

    results = run_pairs(requests)
    outcomes: list[SearchOutcome] = []
    if searches and batch.selection is not None:
        spec = batch.selection.with_dataset(list(batch.evaluation.datasets()))
        probes, outcomes = run_searches(
            searches, make_request, run_pairs, lambda result: judge_probe(result.mlflow_run_id, spec)
        )
        results += probes
        for outcome in outcomes:
            logger.info("search %s", outcome.describe())
            print(f"search {outcome.describe()}", flush=True)
        record.searched = [(o.model, o.recipe_name) for o in outcomes if o.error is None]
    table = summary_table(results)
    logger.info("batch %s summary:\n%s", batch.name, table)
    failed = [r for r in results if r.status == "failed"]
    save_record(settings, record.model_copy(update={"results": results, "finished": True}))
    generations = {f"{Path(r.model).name} x {r.recipe_name}": r.generations for r in results if r.generations}
    finished = finish_batch_run(
        parent,
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
