"""MLflow bookkeeping of a batch: the parent run, failed pairs, the final summary and review."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from prefect import task

from infra.redact import redact
from infra.settings import Settings
from infra.tracking import Tracker
from tasks.review import batch_report, write_review

log = logging.getLogger(__name__)


@task(name="start_batch_run", retries=2, retry_delay_seconds=5)
def start_batch_run(experiment: str, run_name: str, params: dict, tags: dict[str, str]) -> str:
    tracker = Tracker(Settings())
    tracker.end_abandoned_runs(experiment)
    run_id = tracker.start_run(experiment, run_name, tags=tags)
    tracker.log(run_id, params=params)
    return run_id


@task(name="record_failed_pair", retries=2, retry_delay_seconds=5)
def record_failed_pair(experiment: str, parent_run_id: str, model: str, recipe_name: str, error: str) -> str:
    tracker = Tracker(Settings())
    run_id = tracker.start_run(
        experiment, f"{model}/{recipe_name}", parent_run_id, tags={"recipe": recipe_name, "error": error[:5000]}
    )
    tracker.log(run_id, params={"model": model, "recipe_name": recipe_name})
    tracker.finish(run_id, failed=True)
    return run_id


@task(name="finish_batch_run", retries=2, retry_delay_seconds=5)
def finish_batch_run(
    parent_run_id: str, summary: str, metrics: dict[str, float], failed: bool, generations: dict[str, str]
) -> None:
    """Logs the summary and the review (table, plots, generations) read back from the children."""
    tracker = Tracker(Settings())
    tracker.log(parent_run_id, metrics=metrics)
    report = batch_report(tracker, parent_run_id)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "summary.txt").write_text(summary)
        write_review(report, Path(folder), generations)
        try:
            tracker.log_artifacts(parent_run_id, folder)
        except Exception as error:  # noqa: BLE001 - the store may be down; the record and metrics still count
            log.warning("the batch review was not stored with its MLflow run: %s", redact(str(error)))
    tracker.finish(parent_run_id, failed=failed)
