"""Shipping a variant: register the chosen pair's published artifact in the MLflow Model Registry (one registered
model per source model) and move its `champion` alias there -- after a batch's selection, or by hand (promote)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import BaseModel

from infra.registry import CHAMPION, RegisteredVersion, Registry, who_and_when
from infra.tracking import Tracker
from tasks.fetch import slug_of
from tasks.metrics import VERSION_TAGS
from tasks.publish import MANIFEST_SHA256_TAG, MANIFEST_URI_TAG
from tasks.review import BatchReport
from tasks.selection import ModelChoice

log = logging.getLogger(__name__)

SELECTED_TAG = "secateur.selected"  # on the pair run that ships


class Shipped(BaseModel):
    model: str
    recipe: str | None
    version: RegisteredVersion | None  # None: nothing within budget, or registration turned off
    reason: str = ""


def registered_name(model: str) -> str:
    """One registered model per source model: its slug (the label its artifacts live under)."""
    return slug_of(model)


def _recipe_of(params: dict[str, str]) -> str:
    fields = {key.removeprefix("recipe."): value for key, value in params.items() if key.startswith("recipe.")}
    return json.dumps(fields, sort_keys=True)


def register_run(registry: Registry, tracker: Tracker, run_id: str, origin: dict[str, str]) -> RegisteredVersion:
    """The version for a finished pair run's published model (made once), tagged with its recipe and metrics."""
    run = tracker.client.get_run(run_id)
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    source = tags.get("model_uri")
    if run.info.status != "FINISHED" or not source:
        raise LookupError(f"MLflow run {run_id} has no published model (status {run.info.status})")
    model = params["model"]
    version_tags = {
        "recipe_name": params.get("recipe_name", "?"),
        "recipe": _recipe_of(params),
        "model": model,
        "mlflow_run_id": run_id,
        "dtype": params.get("dtype", "-"),
        MANIFEST_URI_TAG: tags.get(MANIFEST_URI_TAG, "-"),
        MANIFEST_SHA256_TAG: tags.get(MANIFEST_SHA256_TAG, "-"),
        **{key: f"{value:.6g}" for key, value in metrics.items() if key.startswith(VERSION_TAGS)},
        **origin,
    }
    return registry.register(
        registered_name(model),
        source,
        run_id,
        params.get("run_fingerprint", run_id),
        version_tags,
        description=f"pruned variants of {model} (secateur); alias {CHAMPION}: the one that ships",
    )


def ship(tracker: Tracker, report: BatchReport) -> list[Shipped]:
    """Per model of the batch: register the chosen variant and move `champion` to it; mark the choice in MLflow."""
    if report.selection is None:
        return []
    registry = Registry(tracker)
    shipped = []
    for choice in report.choices():
        shipped.append(_ship_choice(tracker, registry, report, choice))
    return shipped


def _ship_choice(tracker: Tracker, registry: Registry, report: BatchReport, choice: ModelChoice) -> Shipped:
    name = Path(choice.model).name
    tracker.log(report.run_id, tags={f"selected.{slug_of(choice.model)}": choice.chosen or "none"})
    if choice.chosen is None or choice.run_id is None:
        log.warning("%s: nothing within budget, nothing registered: %s", name, choice.why_none())
        return Shipped(model=choice.model, recipe=None, version=None, reason=choice.why_none())
    tracker.log(choice.run_id, tags={SELECTED_TAG: "true"})
    if report.selection is not None and not report.selection.registry:
        return Shipped(model=choice.model, recipe=choice.chosen, version=None, reason="registry: false")
    origin = {"chosen_by": f"selection of batch {report.batch} (MLflow run {report.run_id})"}
    version = register_run(registry, tracker, choice.run_id, origin)
    registry.set_alias(version.name, version.version)
    log.info("%s: %s ships as %s version %s (alias %s)", name, choice.chosen, version.name, version.version, CHAMPION)
    return Shipped(model=choice.model, recipe=choice.chosen, version=version)


def promote(tracker: Tracker, model: str, run_or_recipe: str) -> RegisteredVersion:
    """Move `champion` by hand to a pair run (its MLflow run id, or the latest finished run of that recipe name
    for the model); the version records who moved it and when."""
    run_id = _find_pair_run(tracker, model, run_or_recipe)
    registry = Registry(tracker)
    stamp = who_and_when()
    version = register_run(registry, tracker, run_id, {"chosen_by": f"promoted by {stamp['by']}"})
    registry.set_alias(version.name, version.version, tags={"promoted_by": stamp["by"], "promoted_at": stamp["at"]})
    return version


def _find_pair_run(tracker: Tracker, model: str, run_or_recipe: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        run = tracker.client.get_run(run_or_recipe)
        if slug_of(run.data.params.get("model", "")) != slug_of(model):
            raise LookupError(f"MLflow run {run_or_recipe} is a variant of {run.data.params.get('model')}, not {model}")
        return run.info.run_id
    except MlflowException:
        pass
    experiments = [e.experiment_id for e in tracker.client.search_experiments()]
    recipe = run_or_recipe.replace("'", "")
    runs = tracker.client.search_runs(
        experiments,
        f"attributes.status = 'FINISHED' and params.recipe_name = '{recipe}' and tags.model_uri != ''",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    for run in runs:
        if slug_of(run.data.params.get("model", "")) == slug_of(model):
            return run.info.run_id
    raise LookupError(f"no finished run of recipe {run_or_recipe!r} for model {model} (give a recipe name or run id)")
