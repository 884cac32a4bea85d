"""prune: the block-sequential engine with a checkpoint after every block, resumable after any crash."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch
from prefect import task
from pydantic import BaseModel

from infra.artifacts import open_store
from infra.checkpoints import BlockCheckpoints
from infra.durable import fsync_path, write_atomic
from infra.hashing import fingerprint, sha256_file
from infra.integrity import hash_files, mismatch, record_stamps
from infra.locks import exclusive, process_alive
from infra.settings import Settings, StatePath
from infra.stage_checkpoint import StageCheckpoint
from pruning_core.adapters import adapter_for
from pruning_core.engine import BlockResult, restore_blocks
from pruning_core.job import allocate_sparsity, prune_structured_to_folder, prune_to_folder
from pruning_core.methods import method_version
from pruning_core.modeling import load_for_compute, output_dtype
from pruning_core.recipe import Recipe
from pruning_core.report import REPORT_FILE, BlockReconstructionReport, Provenance, PruneReport
from pruning_core.structured.depth import block_importance, blocks_to_remove
from pruning_core.structured.llm_pruner import importance_statistics
from tasks.calibrate import CalibrationSet, load_calibration
from tasks.common import numeric_environment, peak_gpu_mib, peak_rss_mib
from tasks.fetch import ModelSnapshot
from tasks.shared import pull_folder, push_folder

log = logging.getLogger(__name__)

ENGINE_VERSION = "4"  # bump when the engine's output changes (it is part of every run fingerprint)


class PrunedModel(BaseModel):
    path: StatePath
    fingerprint: str  # of (model, calibration, recipe, code version)
    content: str = ""  # sha256 of the folder's report, which holds every file's sha256: what was made
    recipe_fingerprint: str
    sparsity: float
    parameters: int
    block_errors: list[float]  # mean relative reconstruction error per block
    prune_seconds: float
    resumed_from_block: int = 0
    resumed_gradients: bool = False  # structured: the gradient statistics came from a checkpoint
    peak_rss_mib: float = 0.0
    peak_gpu_mib: float = 0.0
    block_sparsity: list[float] = []  # per block, when the recipe allocates it (OWL)
    environment: dict[str, str] = {}  # device, torch version, threads of the prune
    resumed_environment: dict[str, str] | None = None  # of the checkpointed blocks, where it differed
    # Structured pruning: parameters_before/after, latency_ms_before/after (CPU forward pass), block_share.
    structure: dict[str, float] = {}


def run_fingerprint(snapshot: ModelSnapshot, calibration: CalibrationSet, recipe: Recipe) -> str:
    code = {"engine": ENGINE_VERSION, "method": method_version(recipe.method)}
    return fingerprint(
        {
            "model": snapshot.fingerprint,
            "calibration": calibration.fingerprint,
            "recipe": recipe.fingerprint(),
            "code": code,
        }
    )


def _cache_key(context, parameters: dict) -> str:
    return "prune-" + run_fingerprint(parameters["snapshot"], parameters["calibration"], parameters["recipe"])


def _block_means(errors: dict[str, float], blocks: int, prefix_of) -> list[float]:
    means = []
    for index in range(blocks):
        values = [v for k, v in errors.items() if k.startswith(prefix_of(index) + ".")]
        means.append(sum(values) / len(values) if values else 0.0)
    return means


def finished_report(
    folder: Path, content: str | None = None, full: bool = False, remember: bool = True
) -> PruneReport | None:
    """The report of a complete folder whose files are the bytes it was made with (else None, logged).

    `content` (the report's own sha256, which the pipeline's results carry) pins the report too; `full`
    hashes every file even where its stamp says it is unchanged (before publishing).
    """
    if not (folder / REPORT_FILE).exists():
        return None
    report = PruneReport.read(folder)
    expected = dict(report.sha256) if report is not None else {}
    if content:
        expected[REPORT_FILE] = content
    problem = (
        "its report is unreadable or lists no sha256"
        if report is None or not report.sha256 or report.sha256.keys() != report.files.keys()
        else mismatch(folder, expected, full=full, remember=remember)
    )
    if problem:
        log.warning("%s: %s; it is made again", folder, problem)
        return None
    return report


def report_digest(folder: Path) -> str:
    """The sha256 of a finished folder's report: it lists every other file's, so it names the whole content."""
    return sha256_file(folder / REPORT_FILE)


def prune_with_checkpoints(
    snapshot: ModelSnapshot, calibration: CalibrationSet, recipe: Recipe, settings: Settings, progress: bool = False
) -> PrunedModel:
    """Prune one (model, calibration, recipe); a rerun resumes from the last valid block checkpoint."""
    run = run_fingerprint(snapshot, calibration, recipe)
    out = settings.root / "models" / snapshot.slug / recipe.fingerprint()[:16] / run
    with exclusive(settings.path("locks"), f"prune-{run}"):  # another process may be pruning it: wait, reuse
        report = finished_report(out) or pull_finished(settings, f"pruned/{run}", out)
        if report is None:
            log.info("pruning %s with %s (run %s)", snapshot.spec, recipe.describe(), run[:16])
            prune_stage = _prune_structured if recipe.structured else _prune
            report = prune_stage(snapshot, calibration, recipe, settings, run, out, progress)
            push_folder(settings, f"pruned/{run}", out)
        else:
            log.info("reusing the finished prune of %s with %s (run %s)", snapshot.spec, recipe.describe(), run[:16])
    return PrunedModel(
        path=str(out),
        fingerprint=run,
        content=report_digest(out),
        recipe_fingerprint=recipe.fingerprint(),
        sparsity=report.total,
        parameters=report.parameters,
        block_errors=report.block_errors,
        prune_seconds=report.prune_seconds,
        resumed_from_block=report.resumed_from_block,
        resumed_gradients=report.resumed_gradients,
        peak_rss_mib=report.peak_rss_mib,
        peak_gpu_mib=report.peak_gpu_mib,
        block_sparsity=report.block_sparsity or [],
        environment=report.environment,
        resumed_environment=report.resumed_environment,
        structure=report.structure.metrics() if report.structure else {},
    )


def pull_finished(settings: Settings, key: str, out: Path) -> PruneReport | None:
    """A finished folder another machine stored under `key`, moved into `out` once it checks out."""
    staging = staging_folder(out)
    report = finished_report(staging, remember=False) if pull_folder(settings, key, staging) else None
    if report is None:
        shutil.rmtree(staging, ignore_errors=True)
        return None
    _move_into_place(staging, out)
    record_stamps(out, {**report.sha256, REPORT_FILE: report_digest(out)})
    return report


def _move_into_place(staging: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, out)
    fsync_path(out.parent)


def commit_folder(staging: Path, out: Path, report: PruneReport) -> PruneReport:
    """Files synced and hashed, then the report (each file's size and sha256) last, then the folder moved
    into place and stamped as verified."""
    files = {p.relative_to(staging).as_posix(): p for p in sorted(staging.rglob("*")) if p.is_file()}
    files.pop(REPORT_FILE, None)
    for path in files.values():
        fsync_path(path)
    report = report.model_copy(
        update={
            "peak_rss_mib": peak_rss_mib(),
            "peak_gpu_mib": peak_gpu_mib(),
            "files": {name: path.stat().st_size for name, path in files.items()},
            "sha256": hash_files(staging, list(files)),
        }
    )
    write_atomic(staging / REPORT_FILE, report.to_json())
    _move_into_place(staging, out)
    record_stamps(out, {**report.sha256, REPORT_FILE: report_digest(out)})
    return report


def staging_folder(out: Path) -> Path:
    """This process's staging folder for `out`; those of processes that are gone are removed."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _provenance(snapshot: ModelSnapshot, calibration: CalibrationSet, run: str) -> Provenance:
    return Provenance(
        model=snapshot.spec,
        model_fingerprint=snapshot.fingerprint,
        run_fingerprint=run,
        calibration_fingerprint=calibration.fingerprint,
    )


def _allocation(model, ids, recipe: Recipe, settings: Settings, run: str, progress: bool) -> list[float] | None:
    """OWL's per-block sparsity, computed once on the dense model and kept for a resume (None: uniform)."""
    if recipe.allocation == "uniform":
        return None
    checkpoint = StageCheckpoint(settings.root / "work" / run / "allocation", run)
    saved = checkpoint.read()
    if saved is not None:
        return saved[0]["block_sparsity"].tolist()
    block_sparsity = allocate_sparsity(model, ids, recipe, settings.device, progress)
    checkpoint.write({"block_sparsity": torch.tensor(block_sparsity, dtype=torch.float64)}, {})
    return block_sparsity


def structured_statistics(
    model: torch.nn.Module, ids: torch.Tensor, recipe: Recipe, device: str, progress: bool
) -> dict[str, torch.Tensor]:
    """The slow measurement of a structured prune, checkpointed: Grams and gradient sums (width) or
    block importance (depth)."""
    if recipe.method == "depth":
        settings = recipe.depth_settings()
        blocks_to_remove(model, settings)  # refuse an impossible ratio before the measurement
        importance = block_importance(model, ids, settings.importance, device, progress)
        return {"block_importance": torch.tensor(importance, dtype=torch.float64)}
    return importance_statistics(model, ids, recipe.structured_settings(), device, progress)


def _prune_structured(
    snapshot: ModelSnapshot,
    calibration: CalibrationSet,
    recipe: Recipe,
    settings: Settings,
    run: str,
    out: Path,
    progress: bool,
) -> PruneReport:
    """Width or depth pruning; its checkpoint is the importance statistics (the slow part), so a rerun skips
    that pass."""
    started = time.perf_counter()
    checkpoint = StageCheckpoint(settings.root / "work" / run / "gradients", run)
    model, tokenizer = load_for_compute(snapshot.path, settings.device, settings.trust_remote_code)
    ids = load_calibration(calibration)
    saved = checkpoint.read()
    if saved is None:
        statistics = structured_statistics(model, ids, recipe, settings.device, progress)
        checkpoint.write(statistics, {"seconds": time.perf_counter() - started})
    else:
        statistics = saved[0]
        log.info("resuming %s from checkpointed importance statistics", snapshot.spec)
    staging = staging_folder(out)
    save_dtype = output_dtype(recipe.dtype, snapshot.path)
    report = prune_structured_to_folder(
        model,
        tokenizer,
        ids,
        recipe,
        staging,
        device=settings.device,
        progress=progress,
        provenance=_provenance(snapshot, calibration, run),
        statistics=statistics,
        save_dtype=save_dtype,
    )
    report = report.model_copy(
        update={
            "resumed_gradients": saved is not None,
            "prune_seconds": time.perf_counter() - started,
            "environment": numeric_environment(settings.device),
            "dtype": _dtype_name(save_dtype),
        }
    )
    report = commit_folder(staging, out, report)
    checkpoint.clear()
    shutil.rmtree(checkpoint.folder.parent, ignore_errors=True)
    return report


def _prune(
    snapshot: ModelSnapshot,
    calibration: CalibrationSet,
    recipe: Recipe,
    settings: Settings,
    run: str,
    out: Path,
    progress: bool,
) -> PruneReport:
    started = time.perf_counter()
    mirror = (
        open_store(settings.artifact_location, settings.upload_attempts, settings.service_timeout_seconds)
        if settings.mirror_checkpoints
        else None
    )
    checkpoints = BlockCheckpoints(settings.root / "work" / run / "checkpoints", run, mirror, f"checkpoints/{run}")
    model, tokenizer = load_for_compute(snapshot.path, settings.device, settings.trust_remote_code)
    ids = load_calibration(calibration)
    block_sparsity = _allocation(model, ids, recipe, settings, run, progress)
    resume = checkpoints.resume_point()
    if resume.start_block:
        restore_blocks(model, [checkpoints.load_weights(path) for path in resume.block_weights])
        log.info("resuming %s at block %d of a checkpointed prune", snapshot.spec, resume.start_block)

    environment = numeric_environment(settings.device)
    earlier = resume.meta[-1].get("environment") if resume.meta else None
    if earlier is not None and earlier != environment:
        log.warning(
            "resuming %s: blocks before %d were pruned with %s, the rest with %s",
            snapshot.spec,
            resume.start_block,
            earlier,
            environment,
        )

    def on_block(result: BlockResult) -> None:
        meta = {
            "errors": result.errors,
            "seconds": result.seconds,
            "environment": environment,
            "experts": {name: usage.model_dump() for name, usage in result.experts.items()},
            "reconstruction": result.reconstruction.model_dump() if result.reconstruction else None,
        }
        checkpoints.write(result.index, result.state_dict, result.next_inputs, meta)

    staging = staging_folder(out)
    save_dtype = output_dtype(recipe.dtype, snapshot.path)
    earlier_errors = {k: v for meta in resume.meta for k, v in meta["errors"].items()}
    earlier_experts = {k: v for meta in resume.meta for k, v in meta.get("experts", {}).items()}
    earlier_refits = {
        index: BlockReconstructionReport(**meta["reconstruction"])
        for index, meta in enumerate(resume.meta)  # blocks 0 .. start_block - 1, in order
        if meta.get("reconstruction") is not None
    }
    adapter = adapter_for(model)
    report = prune_to_folder(
        model,
        tokenizer,
        ids,
        recipe,
        staging,
        settings.device,
        progress=progress,
        provenance=_provenance(snapshot, calibration, run),
        start_block=resume.start_block,
        start_inputs=resume.inputs,
        on_block=on_block,
        block_sparsity=block_sparsity,
        forward_budget_mib=settings.forward_budget_mib,
        save_dtype=save_dtype,
    )
    errors = {**earlier_errors, **report.reconstruction_error}
    report = report.model_copy(
        update={
            "reconstruction_error": errors,
            "experts": {**earlier_experts, **report.experts},
            "block_reconstruction": {**earlier_refits, **report.block_reconstruction},
            "block_errors": _block_means(errors, len(adapter.blocks(model)), adapter.block_prefix),
            "resumed_from_block": resume.start_block,
            "prune_seconds": time.perf_counter() - started,
            "environment": environment,
            "resumed_environment": earlier if earlier != environment else None,
            "dtype": _dtype_name(save_dtype),
        }
    )
    report = commit_folder(staging, out, report)
    checkpoints.clear()
    shutil.rmtree(checkpoints.folder.parent, ignore_errors=True)  # the allocation checkpoint too
    return report


@task(name="prune", cache_key_fn=_cache_key, persist_result=True)
def prune(snapshot: ModelSnapshot, calibration: CalibrationSet, recipe: Recipe) -> PrunedModel:
    """No retries: the checkpoints already make a rerun cheap, and a bad recipe fails the same way twice."""
    return prune_with_checkpoints(snapshot, calibration, recipe, Settings())
