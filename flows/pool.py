"""A batch's pairs as flow runs of the `compress-model` deployment on a Prefect work pool.

The batch flow first submits one `prepare-model` run per model (fetch, calibration set, dense
evaluation, left in the artifact store for every worker), then, as each model is prepared, its pairs
(subflow runs linked to the batch run), and watches them all: a pair that completed has written its
result to the store, a failed one is a failed pair, and a run whose worker is gone -- crashed or
cancelled, or running but silent (no heartbeat in the store for `stale_after_seconds`) -- is marked
crashed and submitted again, up to `pair_attempts` runs. The rerun resumes from the mirrored block
checkpoints on whichever worker takes it. The artifact store is the one service every worker and the
batch share, so heartbeats and results live there (and are removed once read).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from flows.pairs import PairRequest, PairResult
from infra.artifacts import ArtifactStore, ArtifactStoreError
from infra.redact import redact
from infra.settings import Settings

log = logging.getLogger(__name__)

MODEL_FLOW = "compress-model"
PREPARE_FLOW = "prepare-model"


def model_deployment(pool: str) -> str:
    """The deployment of the pair flow on `pool` (one per pool, named after it)."""
    return f"{MODEL_FLOW}/{pool}"


def heartbeat_key(flow_run_id: UUID | str) -> str:
    return f"pool/heartbeats/{flow_run_id}"


def result_key(flow_run_id: UUID | str) -> str:
    return f"pool/results/{flow_run_id}.json"


def deployed_run_id() -> UUID | None:
    """This flow run's id when it was started from a deployment (by a worker), else None (in-process subflow)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    return run.id if run is not None and run.deployment_id is not None else None


@contextlib.contextmanager
def heartbeat(store: ArtifactStore, flow_run_id: UUID | str, every: float) -> Iterator[None]:
    """Write the time to the store every `every` seconds while the block runs (a thread; stops with it)."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                store.write_text(heartbeat_key(flow_run_id), f"{time.time():.3f}")
            except ArtifactStoreError as error:  # the watcher sees silence; the work itself goes on
                log.warning("heartbeat not written: %s", error)
            if stop.wait(every):
                return

    thread = threading.Thread(target=beat, name="secateur-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every + 5)


@dataclass
class _Job:
    """One flow run to have on the pool: which deployment, its parameters, and what it is for."""

    key: tuple[str, int]  # ("prepare", model index) or ("pair", request index)
    deployment: str
    parameters: dict
    name: str


@dataclass
class _Child:
    job: _Job
    flow_run_id: UUID
    attempt: int
    scheduled: datetime  # when its first attempt was scheduled: a rerun keeps its place ahead of later runs


class _Watch:
    """The batch's view of the flow runs it submitted."""

    def __init__(self, settings: Settings, client, store: ArtifactStore) -> None:
        self.settings, self.client, self.store = settings, client, store

    def submit(self, job: _Job, lost: _Child | None = None) -> _Child:
        """A flow run of `job`; in place of a `lost` one, scheduled at its first attempt's time, so that workers
        take it before the runs queued since (they take the earliest scheduled first)."""
        from prefect.deployments import run_deployment

        attempt = lost.attempt + 1 if lost else 1
        run = run_deployment(
            job.deployment,
            parameters=job.parameters,
            scheduled_time=lost.scheduled if lost else None,
            timeout=0,
            as_subflow=True,
            flow_run_name=job.name + (f" (attempt {attempt})" if attempt > 1 else ""),
            tags=[f"attempt-{attempt}"],
        )
        scheduled = lost.scheduled if lost else (run.expected_start_time or datetime.now(UTC))
        return _Child(job, run.id, attempt, scheduled)

    def status(self, child: _Child) -> tuple[str, str]:
        """("running" | "completed" | "failed" | "lost", why)."""
        state = self.client.read_flow_run(child.flow_run_id).state
        if state.is_completed():
            return "completed", ""
        if state.is_failed():
            return "failed", redact(" ".join((state.message or "failed").split()))
        if state.is_crashed() or state.is_cancelled():
            return "lost", f"its run {state.name.lower()}: {redact(state.message or '')}".rstrip(": ")
        if not (state.is_running() or state.is_pending()):
            return "running", ""  # scheduled: waiting for a free worker
        beat = self.store.read_text(heartbeat_key(child.flow_run_id))
        silent = time.time() - (float(beat) if beat else state.timestamp.timestamp())
        # A pending run's process is still starting (imports, model download): it gets three times as long.
        allowed = self.settings.stale_after_seconds * (1 if state.is_running() else 3)
        if silent <= allowed:
            return "running", ""
        from prefect.states import Crashed

        reason = f"no heartbeat from its worker for {silent:.0f} s"
        self.client.set_flow_run_state(child.flow_run_id, Crashed(message=reason), force=True)
        return "lost", reason

    def result(self, child: _Child, request: PairRequest) -> PairResult:
        text = self.store.read_text(result_key(child.flow_run_id))
        if text is None:
            return PairResult.failed(request, "its run completed without a result in the store", child.attempt)
        return PairResult.model_validate_json(text).model_copy(update={"attempts": child.attempt})

    def end_tracking(self, child: _Child) -> None:
        """A lost pair run may have died while publishing: its MLflow run ends as FAILED, not RUNNING."""
        from infra.tracking import FLOW_RUN_TAG, Tracker

        experiment = child.job.parameters.get("experiment")
        if experiment:
            with contextlib.suppress(Exception):  # tracking trouble must not stop the batch
                Tracker(self.settings).fail_runs_tagged(experiment, FLOW_RUN_TAG, str(child.flow_run_id))

    def forget(self, child: _Child) -> None:
        """The run is over: its heartbeat and result objects go."""
        for key in (heartbeat_key(child.flow_run_id), result_key(child.flow_run_id)):
            with contextlib.suppress(ArtifactStoreError):
                self.store.delete_prefix(key)


def _jobs(pool: str, requests: list[PairRequest]) -> tuple[list[_Job], dict[int, list[_Job]]]:
    """A prepare run per model (fetch, calibration, dense evaluation), and the pair runs that wait for it."""
    models = list(dict.fromkeys(r.model for r in requests))
    prepares, pairs = [], {m: [] for m in range(len(models))}
    for number, model in enumerate(models):
        first = next(r for r in requests if r.model == model)
        parameters = {
            "model": model,
            "calibration": first.calibration.model_dump(mode="json"),
            "evaluation": first.evaluation.model_dump(mode="json"),
        }
        prepares.append(_Job(("prepare", number), f"{PREPARE_FLOW}/{pool}", parameters, "prepare"))
    for index, request in enumerate(requests):
        job = _Job(("pair", index), model_deployment(pool), request.model_dump(mode="json"), request.recipe_name)
        pairs[models.index(request.model)].append(job)
    return prepares, pairs


class _PoolRun:
    """The batch's flow runs on the pool as a small state machine. Each child run is polled until it ends:

    running  -> keep watching
    lost     -> its MLflow run ended; submitted again (a new attempt) while attempts remain, else failed
    failed   -> a prepare fails its model's pairs; a pair is a failed pair
    completed-> a prepare submits its model's pairs; a pair's result is read from the store
    """

    def __init__(self, watch: _Watch, requests: list[PairRequest], pairs_of: dict[int, list[_Job]], on_result) -> None:
        self.watch, self.requests, self.pairs_of, self.on_result = watch, requests, pairs_of, on_result
        self.results: dict[int, PairResult] = {}

    def finish(self, index: int, result: PairResult) -> None:
        self.results[index] = result
        self.on_result(result)

    def advance(self, child: _Child) -> list[_Child]:
        """The children that replace `child` after one look at it (itself while it runs)."""
        status, why = self.watch.status(child)
        if status == "running":
            return [child]
        kind, index = child.job.key
        outcome = self.watch.result(child, self.requests[index]) if kind == "pair" and status == "completed" else None
        self.watch.forget(child)
        if status == "lost":
            self.watch.end_tracking(child)
            if child.attempt < self.watch.settings.pair_attempts:
                log.warning("%s (%s): %s; running it again", child.job.name, child.job.parameters["model"], why)
                return [self.watch.submit(child.job, lost=child)]
            why = f"{why} (gave up after {child.attempt} runs)"
        if kind == "prepare":
            return self._prepared(index, status, why)
        self.finish(index, outcome or PairResult.failed(self.requests[index], why, child.attempt))
        return []

    def _prepared(self, model: int, status: str, why: str) -> list[_Child]:
        if status == "completed":
            return [self.watch.submit(job) for job in self.pairs_of[model]]
        for job in self.pairs_of[model]:
            request = self.requests[job.key[1]]
            self.finish(job.key[1], PairResult.failed(request, f"preparing {request.model} failed: {why}"))
        return []


def run_on_pool(
    pool: str, requests: list[PairRequest], settings: Settings, on_result: Callable[[PairResult], None]
) -> list[PairResult]:
    """Prepare each model once on the pool, then its pairs; lost runs go again; results in `requests` order."""
    from prefect.client.orchestration import get_client

    prepares, pairs_of = _jobs(pool, requests)
    with get_client(sync_client=True) as client:
        run = _PoolRun(_Watch(settings, client, settings.artifact_store()), requests, pairs_of, on_result)
        children = [run.watch.submit(job) for job in prepares]
        while children:
            time.sleep(settings.poll_seconds)
            children = [after for child in children for after in run.advance(child)]
    return [run.results[index] for index in range(len(requests))]
