"""publish: upload the pruned model and its report to the artifact store, then log the pair to MLflow."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel

from infra.artifacts import MANIFEST
from infra.locks import exclusive
from infra.plots import line_plot
from infra.settings import Settings
from infra.tracking import FLOW_RUN_TAG, Tracker
from pruning_core.recipe import Recipe
from pruning_core.report import REPORT_FILE
from tasks.calibrate import CalibrationSpec
from tasks.common import retry_if_transient
from tasks.evaluate import Evaluation
from tasks.fetch import ModelSnapshot
from tasks.metrics import BLOCK_ERROR, pair_metrics
from tasks.prune import ENGINE_VERSION, PrunedModel, finished_report
from tasks.recover import RecoveredModel


class PairRecord(BaseModel):
    """Everything known about one finished (model, recipe): what publish stores and logs."""

    recipe_name: str
    recipe: Recipe
    snapshot: ModelSnapshot
    calibration: CalibrationSpec
    calibration_fingerprint: str
    pruned: PrunedModel
    evaluation: Evaluation  # of the final model (after recovery when there is one)
    dense: Evaluation
    recovered: RecoveredModel | None = None
    before_recovery: Evaluation | None = None  # perplexity of the pruned model before recovery
    stage_seconds: dict[str, float]

    @property
    def model_path(self) -> str:
        """The model this pair delivers: the recovered one when the recipe has a recovery."""
        return self.recovered.path if self.recovered else self.pruned.path

    @property
    def fingerprint(self) -> str:
        return self.recovered.fingerprint if self.recovered else self.pruned.fingerprint


MANIFEST_URI_TAG, MANIFEST_SHA256_TAG = "manifest_uri", "manifest_sha256"  # what a registered version points at


class Publication(BaseModel):
    model_uri: str
    report_uri: str
    mlflow_run_id: str | None


def artifact_key(record: PairRecord) -> str:
    """Content-addressed: <model-slug>/<recipe-fingerprint>/<run-fingerprint>."""
    return f"{record.snapshot.slug}/{record.recipe.fingerprint()[:16]}/{record.fingerprint}"


def params_of(record: PairRecord) -> dict:
    from pruning_core.methods import method_version

    evaluation = record.evaluation
    return {
        "model": record.snapshot.spec,
        "model_revision": record.snapshot.revision or "-",
        "model_fingerprint": record.snapshot.fingerprint,
        "recipe_name": record.recipe_name,
        "recipe": record.recipe.model_dump(mode="json"),
        "calibration": record.calibration.model_dump(mode="json"),
        "calibration_fingerprint": record.calibration_fingerprint,
        "evaluation": {
            "seq_len": evaluation.seq_len,
            "split": {name: a.split for name, a in evaluation.zero_shot.items()},
            "items": {name: a.items for name, a in evaluation.zero_shot.items()},
            "skipped": evaluation.skipped_tasks,
        },
        "code_version": f"engine-{ENGINE_VERSION}/{record.recipe.method}-{method_version(record.recipe.method)}",
        "run_fingerprint": record.fingerprint,
        "dtype": record.evaluation.dtype or "-",
        "dense_dtype": record.dense.dtype or "-",
        "speed_device": record.evaluation.speed_device or "-",
        "recovery_precision": record.recovered.precision if record.recovered is not None else "-",
        "speed_notes": record.evaluation.speed_notes or "-",
        "environment": record.pruned.environment,
        "resumed_environment": record.pruned.resumed_environment or "-",
    }


def generations_text(dense: dict[str, str], pruned: dict[str, str], pruned_name: str) -> str:
    """Greedy continuations of the sanity prompts, dense and pruned one under the other."""
    blocks = []
    for prompt, continuation in pruned.items():
        blocks.append(
            f"### {prompt}\n[dense] {prompt}{dense.get(prompt, '?')}\n[{pruned_name}] {prompt}{continuation}\n"
        )
    return "\n".join(blocks)


def _report_folder(record: PairRecord, folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(
        yaml.safe_dump({"name": record.recipe_name, **record.recipe.model_dump(mode="json")}, sort_keys=True)
    )
    (folder / "report.json").write_text(record.model_dump_json(indent=2))
    if record.evaluation.generations:
        (folder / "generations.txt").write_text(
            generations_text(record.dense.generations, record.evaluation.generations, record.recipe_name)
        )
    title = f"{record.snapshot.slug} / {record.recipe_name}"
    if record.pruned.block_errors:
        line_plot(
            record.pruned.block_errors,
            folder / "block_errors.png",
            f"{title}: reconstruction error per block",
            "block",
            "mean relative error",
        )
    if record.pruned.block_sparsity:
        line_plot(record.pruned.block_sparsity, folder / "block_sparsity.png", f"{title}: OWL", "block", "sparsity")
    if record.recovered is not None:
        line_plot(record.recovered.losses, folder / "recovery_loss.png", f"{title}: LoRA recovery", "step", "loss")
    return folder


class UnverifiedModel(ValueError):
    """The folder to publish is not the bytes that were made and evaluated (permanent: never retried)."""


def verified_files(record: PairRecord) -> dict[str, str]:
    """sha256 by name of the folder this pair publishes, every file hashed now against its creation record."""
    made = record.recovered or record.pruned
    report = finished_report(Path(made.path), made.content or None, full=True, remember=False)
    if report is None or not made.content:
        raise UnverifiedModel(
            f"{made.path}: not the bytes that were made and evaluated (altered or gone); nothing published. "
            "Run the batch again: the model is made anew"
        )
    return {**report.sha256, REPORT_FILE: made.content}


def publish_pair(record: PairRecord, settings: Settings, parent_run_id: str | None, experiment: str) -> Publication:
    """One process at a time per fingerprint: the report folder under the state dir is shared."""
    with exclusive(settings.path("locks"), f"publish-{record.fingerprint}"):
        return _publish(record, settings, parent_run_id, experiment)


def _publish(record: PairRecord, settings: Settings, parent_run_id: str | None, experiment: str) -> Publication:
    expected = verified_files(record)
    store = settings.artifact_store()
    key = artifact_key(record)
    report_dir = _report_folder(record, settings.root / "work" / record.fingerprint / "report")
    meta = {"run_fingerprint": record.fingerprint}
    # Immutable keys: where another publisher committed other bytes for this key, ours get a content key,
    # and MLflow points at the manifest of exactly the bytes this pair evaluated.
    manifest = store.put_folder(record.model_path, f"{key}/model", meta, expected=expected)
    report_manifest = store.put_folder(report_dir, f"{key}/report", meta)
    publication = Publication(model_uri=manifest["uri"], report_uri=report_manifest["uri"], mlflow_run_id=None)
    manifest_text = json.dumps(manifest, indent=2, sort_keys=True)  # as the store holds it
    tracker = Tracker(settings)
    run_id = tracker.start_run(
        experiment,
        f"{record.snapshot.slug}/{record.recipe_name}",
        parent_run_id,
        tags={
            "model_uri": publication.model_uri,
            MANIFEST_URI_TAG: f"{publication.model_uri}/{MANIFEST}",
            MANIFEST_SHA256_TAG: hashlib.sha256(manifest_text.encode()).hexdigest(),
            "recipe": record.recipe_name,
            FLOW_RUN_TAG: str(flow_run.get_id() or "-"),  # a lost pair's run is ended by the batch
        },
    )
    series = {BLOCK_ERROR: record.pruned.block_errors, "block_sparsity": record.pruned.block_sparsity}
    if record.recovered is not None:
        series["recovery_loss"] = record.recovered.losses
        if record.recovered.heldout:  # distillation: held-out perplexity against training steps
            series["recovery_heldout_ppl"] = record.recovered.heldout
    try:
        tracker.log(run_id, params=params_of(record), metrics=pair_metrics(record), series=series)
        (report_dir / "model_uri.txt").write_text(publication.model_uri + "\n")
        (report_dir / "summary.json").write_text(json.dumps(pair_metrics(record), indent=2, sort_keys=True))
        tracker.log_artifacts(run_id, report_dir)
    except BaseException:
        # A retry starts a new run; this one must not stay RUNNING beside it.
        with contextlib.suppress(Exception):
            tracker.finish(run_id, failed=True)
        raise
    tracker.finish(run_id)
    return publication.model_copy(update={"mlflow_run_id": run_id})


@task(name="publish", cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient)
def publish(record: PairRecord, settings: Settings, parent_run_id: str | None, experiment: str) -> Publication:
    """Not cached: uploads skip identical objects, and each batch run gets its own MLflow runs. Retried as the
    settings say (`tasks.common.retried`)."""
    return publish_pair(record, settings, parent_run_id, experiment)
