"""One (model, recipe) pair: its stages as Prefect tasks, and what a flow run of it starts with.

The pair and prepare flows (`flows.batch.compress_model`, `prepare_model`) are entry points: a pool worker
starts each in a process of its own. `flow_settings` builds their settings once and, on a pool, shares results
and mirrors checkpoints through the store while a heartbeat there says the run is alive.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import TypeVar

from prefect import Task, get_run_logger
from pydantic import BaseModel

from flows.pairs import PairRequest, PairResult
from flows.pool import deployed_run_id, heartbeat, result_key
from infra.settings import Settings, prepare_environment, state_paths_under
from tasks.calibrate import CalibrationSet, CalibrationSpec, CalibrationStage
from tasks.common import retried
from tasks.evaluate import EvaluateStage, Evaluation, EvaluationSpec
from tasks.fetch import ModelSnapshot, fetch_model
from tasks.prune import PrunedModel, PruneStage
from tasks.publish import PairRecord, generations_text, publish
from tasks.recover import RecoveredModel, RecoverStage
from tasks.stage import Stage, restore, stage_task

ResultT = TypeVar("ResultT", bound=BaseModel)


class PairStages:
    """Runs one pair's stages as Prefect tasks, remembering each one's state and compute time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.states: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def cached(self, name: str, stage: Stage[ResultT]) -> ResultT:
        """A stage whose Prefect record is trusted once the files it names are here (else made again)."""
        task = stage_task(stage, self.settings)

        def run() -> tuple[str, ResultT]:
            state = task(stage, self.settings, return_state=True)
            value = state.result()
            if state.name == "Cached" and not restore(stage, value, self.settings):
                # The record points at files that are gone or not the bytes that were made (and no store holds
                # them): compute again and refresh the record.
                get_run_logger().warning("stage %s: the cached result's files are missing or altered; made again", name)
                state = task.with_options(refresh_cache=True)(stage, self.settings, return_state=True)
                value = state.result()
            return state.name, value

        return self._timed(name, run)

    def retried(self, name: str, task: Task, *args) -> ResultT:
        """An uncached task (fetch, publish), with the configured retries."""

        def run() -> tuple[str, ResultT]:
            state = retried(task, self.settings)(*args, self.settings, return_state=True)
            return state.name, state.result()

        return self._timed(name, run)

    def _timed(self, name: str, run) -> ResultT:
        started = time.perf_counter()
        get_run_logger().info("stage %s started", name)  # the log file shows where a run was
        with state_paths_under(self.settings):  # results hold `$SECATEUR_HOME/...`, read back under this one
            self.states[name], value = run()
        # A cached result keeps the time its computation took; fetch and publish are timed here.
        computed = getattr(value, "seconds", None) or getattr(value, "prune_seconds", None)
        self.seconds[name] = computed or time.perf_counter() - started
        return value

    def prepare(
        self, model: str, calibration: CalibrationSpec, evaluation: EvaluationSpec
    ) -> tuple[ModelSnapshot, CalibrationSet, Evaluation]:
        """What every recipe of a model shares: its snapshot, calibration set and dense evaluation."""
        snapshot = self.retried("fetch", fetch_model, model)
        calibration_set = self.cached("calibrate", CalibrationStage(snapshot=snapshot, spec=calibration))
        dense = self.cached(
            "evaluate_dense",
            EvaluateStage(model_path=snapshot.path, model_fingerprint=snapshot.fingerprint, spec=evaluation),
        )
        return snapshot, calibration_set, dense

    def evaluate(self, name: str, made: PrunedModel | RecoveredModel, spec: EvaluationSpec) -> Evaluation:
        return self.cached(
            name, EvaluateStage(model_path=made.path, model_fingerprint=measured_identity(made), spec=spec)
        )


def measured_identity(made: PrunedModel | RecoveredModel) -> str:
    """What an evaluation of a made model is keyed by: its inputs and the bytes they gave (two machines may
    make different bytes from the same inputs, and each evaluation describes its own)."""
    return f"{made.fingerprint}-{made.content[:16]}"


@contextlib.contextmanager
def flow_settings() -> Iterator[Settings]:
    """The settings of this flow run, built once: on a pool (started from a deployment by a worker), results
    shared and checkpoints mirrored through the store, and a heartbeat there while it runs."""
    settings, run_id = Settings(), deployed_run_id()
    prepare_environment(settings)
    if run_id is None:
        yield settings
        return
    settings = settings.on_pool()
    with heartbeat(settings.artifact_store(), run_id, settings.heartbeat_seconds):
        yield settings


def compress_pair(settings: Settings, request: PairRequest) -> PairResult:
    """fetch -> calibrate -> dense baseline -> prune (checkpointed) [-> recover] -> evaluate -> publish.

    With a recovery (structured recipes), the pruned model's perplexity is measured before it too."""
    recipe, evaluation = request.recipe, request.evaluation
    stages = PairStages(settings)
    snapshot, calibration_set, dense = stages.prepare(request.model, request.calibration, evaluation)
    # Recipes that differ only in their recovery share one prune.
    prune = PruneStage(snapshot=snapshot, calibration=calibration_set, recipe=recipe.without_recovery())
    pruned = stages.cached("prune", prune)
    recovered = before_recovery = None
    final: PrunedModel | RecoveredModel = pruned
    if recipe.recovery is not None:
        before_spec = evaluation.perplexity_only()
        if before_spec is not None:
            before_recovery = stages.evaluate("evaluate_before_recovery", pruned, before_spec)
        recovery = RecoverStage(pruned=pruned, spec=recipe.recovery, teacher=snapshot)
        final = recovered = stages.cached("recover", recovery)
    record = PairRecord(
        recipe_name=request.recipe_name,
        recipe=recipe,
        snapshot=snapshot,
        calibration=request.calibration,
        calibration_fingerprint=calibration_set.fingerprint,
        pruned=pruned,
        evaluation=stages.evaluate("evaluate", final, evaluation),
        dense=dense,
        recovered=recovered,
        before_recovery=before_recovery,
        stage_seconds=stages.seconds,
    )
    return _published(record, stages, settings, parent_run_id=request.parent_run_id, experiment=request.experiment)


def _published(
    record: PairRecord, stages: PairStages, settings: Settings, *, parent_run_id: str | None, experiment: str
) -> PairResult:
    """The pair published (artifact store, MLflow) and its result; on a pool, left in the store for the batch."""
    get_run_logger().info("stage publish started")
    with state_paths_under(settings):  # report.json holds `$SECATEUR_HOME/...`, never this machine's paths
        publication = retried(publish, settings)(record, settings, parent_run_id, experiment)
    dense, result = record.dense, record.evaluation
    pair = PairResult(
        model=record.snapshot.spec,
        recipe_name=record.recipe_name,
        status="completed",
        sparsity=record.pruned.sparsity,
        perplexity=result.perplexity,
        dense_perplexity=dense.perplexity,
        generations=generations_text(dense.generations, result.generations, record.recipe_name) or None,
        prune_seconds=record.pruned.prune_seconds,
        model_uri=publication.model_uri,
        mlflow_run_id=publication.mlflow_run_id,
        task_states=stages.states,
        stage_seconds=stages.seconds,
        worker=f"{socket.gethostname()}:{settings.root}",
    )
    run_id = deployed_run_id()
    if run_id is not None:  # on a pool: the batch reads the result from the store
        settings.artifact_store().write_text(result_key(run_id), pair.model_dump_json())
    return pair
