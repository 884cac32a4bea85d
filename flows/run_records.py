"""Batch run records: written when a batch starts, updated after every pair, in the state dir and the store.

The copy in the artifact store is what `secateur retry` finds from any machine, including for a batch
whose process died (its pairs without a result are retried with the failed ones).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ValidationError

from flows.pairs import PairResult
from infra.artifacts import ArtifactStoreError
from infra.durable import write_atomic
from infra.settings import Settings

log = logging.getLogger(__name__)


class RunRecord(BaseModel):
    flow_run_id: str
    flow_run_name: str
    batch: str
    config: dict
    mlflow_run_id: str
    pool: str | None = None
    finished: bool = False
    pairs: list[tuple[str, str]]  # (model, recipe name) of every pair or search the run was asked for
    results: list[PairResult] = []
    searched: list[tuple[str, str]] = []  # (model, search recipe) of the searches that ran to their end

    def unfinished_pairs(self) -> list[list[str]]:
        """Pairs and searches that failed or never reported (the run crashed first)."""
        done = {(r.model, r.recipe_name) for r in self.results if r.status == "completed"} | set(self.searched)
        return [[model, recipe] for model, recipe in self.pairs if (model, recipe) not in done]


def local_path(settings: Settings, run_id: str) -> Path:
    return settings.path("runs") / f"{run_id}.json"


def _store(settings: Settings):
    return settings.artifact_store()


def save_record(settings: Settings, record: RunRecord) -> None:
    """Atomically here; in the store by id and as the batch's latest run (a store failure is only logged)."""
    text = record.model_dump_json(indent=2)
    write_atomic(local_path(settings, record.flow_run_id), text)
    try:
        store = _store(settings)
        store.write_text(f"runs/{record.flow_run_id}.json", text)
        store.write_text(f"runs/latest/{record.batch}.json", text)
    except ArtifactStoreError as error:
        log.warning("batch run record not stored: %s", error)


def _parse(text: str | None) -> RunRecord | None:
    if text is None:
        return None
    try:
        return RunRecord.model_validate_json(text)
    except ValidationError:
        return None


def find_record(settings: Settings, run: str) -> RunRecord:
    """A batch run by Prefect flow run id or name (the latest of that batch), from here or the store."""
    folder = settings.path("runs")
    direct = _parse(local_path(settings, run).read_text()) if local_path(settings, run).is_file() else None
    if direct is not None:
        return direct
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        record = _parse(path.read_text())
        if record is not None and run in (record.flow_run_name, record.batch):
            return record
    store = _store(settings)
    for key in (f"runs/{run}.json", f"runs/latest/{run}.json"):
        try:
            record = _parse(store.read_text(key))
        except (ArtifactStoreError, ValueError):  # a name that is no store key
            record = None
        if record is not None:
            return record
    raise LookupError(f"no batch run {run!r} under {folder} or in {store.uri}")
