"""MLflow bookkeeping of a batch: the parent run, failed pairs, the final summary and review."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from infra.plots import scatter_plot
from infra.redact import redact
from infra.settings import Settings
from infra.tracking import Tracker
from tasks.registration import Shipped, ship
from tasks.review import batch_report, pair_verdict, write_review
from tasks.selection import SearchOutcome, SelectionSpec, Verdict

log = logging.getLogger(__name__)


@task(name="start_batch_run", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def start_batch_run(settings: Settings, experiment: str, run_name: str, params: dict, tags: dict[str, str]) -> str:
    tracker = Tracker(settings)
    tracker.end_abandoned_runs(experiment)
    run_id = tracker.start_run(experiment, run_name, tags=tags)
    tracker.log(run_id, params=params)
    return run_id


@task(name="record_failed_pair", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def record_failed_pair(
    settings: Settings, experiment: str, parent_run_id: str, model: str, recipe_name: str, error: str
) -> str:
    tracker = Tracker(settings)
    run_id = tracker.start_run(
        experiment, f"{model}/{recipe_name}", parent_run_id, tags={"recipe": recipe_name, "error": error[:5000]}
    )
    tracker.log(run_id, params={"model": model, "recipe_name": recipe_name})
    tracker.finish(run_id, failed=True)
    return run_id


def judge_probe(settings: Settings, run_id: str | None, spec: SelectionSpec) -> Verdict:
    """A search probe's published metrics against the budget."""
    if run_id is None:
        return Verdict(recipe="?", problem="the probe has no MLflow run")
    return pair_verdict(Tracker(settings), run_id, spec)


def search_plots(searches: list[SearchOutcome], folder: Path) -> list[Path]:
    """Per search: each budgeted metric against the probed sparsity, with its limit."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for outcome in searches:
        curves: dict[str, list[tuple[float, float]]] = {}
        limits: dict[str, float] = {}
        for probe in outcome.probes:
            for check in probe.checks:
                label = f"{check.limit} {check.subject}"
                curves.setdefault(label, []).append((probe.sparsity, check.measured))
                limits[label] = check.allowed
        for label, points in curves.items():
            limit = limits[label]
            name = f"{Path(outcome.model).name}.{outcome.recipe_name}.{label.split()[0]}.{label.split()[1]}"
            paths.append(
                scatter_plot(
                    {label: points, "limit": [(outcome.low, limit), (outcome.high, limit)]},
                    folder / f"search.{name}.png",
                    f"{Path(outcome.model).name} / {outcome.recipe_name}: {label} vs sparsity",
                    "sparsity",
                    label.split()[0],
                )
            )
    return paths


@task(name="finish_batch_run", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def finish_batch_run(
    settings: Settings,
    parent_run_id: str,
    *,
    summary: str,
    metrics: dict[str, float],
    failed: bool,
    generations: dict[str, str],
    searches: list[SearchOutcome] | None = None,
) -> list[str]:
    """Logs the summary and the review (table, plots, generations) read back from the children; with a
    selection, ships each model's chosen variant (registry, alias). Returns a line per model on what ships."""
    tracker = Tracker(settings)
    tracker.log(parent_run_id, metrics=metrics)
    report = batch_report(tracker, parent_run_id)
    shipped = ship(tracker, report)
    lines = [_shipped_line(item) for item in shipped]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "summary.txt").write_text(summary)
        if shipped:
            (Path(folder) / "selection.json").write_text(
                json.dumps([item.model_dump(mode="json") for item in shipped], indent=2)
            )
        if searches:
            (Path(folder) / "searches.json").write_text(
                json.dumps([outcome.model_dump(mode="json") for outcome in searches], indent=2)
            )
            search_plots(searches, Path(folder) / "plots")
        write_review(report, Path(folder), generations)
        try:
            tracker.log_artifacts(parent_run_id, folder)
        except Exception as error:  # noqa: BLE001 - the store may be down; the record and metrics still count
            log.warning("the batch review was not stored with its MLflow run: %s", redact(str(error)))
    tracker.finish(parent_run_id, failed=failed)
    return lines


def _shipped_line(item: Shipped) -> str:
    name = Path(item.model).name
    if item.recipe is None:
        return f"{name}: nothing ships (within budget: none) -- {item.reason}"
    if item.version is None:
        return f"{name}: {item.recipe} is chosen ({item.reason}: not registered)"
    return (
        f"{name}: {item.recipe} ships as registered model {item.version.name} version {item.version.version} (champion)"
    )
