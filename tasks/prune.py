"""prune: the block-sequential engine with a checkpoint after every block, resumable after any crash."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel

from infra.checkpoints import BlockCheckpoints
from infra.durable import fsync_path, replace_with, staging_path, write_atomic
from infra.hashing import fingerprint, sha256_file
from infra.integrity import hash_files, mismatch, record_stamps
from infra.locks import process_alive
from infra.settings import Settings, StatePath
from infra.stage_checkpoint import StageCheckpoint
from pruning_core.engine import BlockResult, restore_blocks
from pruning_core.job import allocate_sparsity, prune_structured_to_folder, prune_to_folder
from pruning_core.methods import method_version
from pruning_core.modeling import load_for_compute, output_dtype
from pruning_core.recipe import Recipe
from pruning_core.report import (
    REPORT_FILE,
    BlockReconstructionReport,
    FolderFacts,
    Provenance,
    PruneReport,
    ResumedBlocks,
    RunFacts,
)
from pruning_core.structured.depth import block_importance, blocks_to_remove
from pruning_core.structured.llm_pruner import importance_statistics
from tasks.calibrate import CalibrationSet, load_calibration
from tasks.common import numeric_environment, peak_gpu_mib, peak_rss_mib
from tasks.fetch import ModelSnapshot
from tasks.shared import pull_folder, push_folder
from tasks.stage import Stage, run_stage

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

    @classmethod
    def from_report(cls, out: Path, run: str, recipe_fingerprint: str, report: PruneReport) -> PrunedModel:
        return cls(
            path=str(out),
            fingerprint=run,
            content=report_digest(out),
            recipe_fingerprint=recipe_fingerprint,
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


class PruneStage(Stage[PrunedModel]):
    """One (model, calibration, recipe): a model folder under `models/`, checkpointed after every block."""

    kind: ClassVar[str] = "prune"
    task_name: ClassVar[str] = "prune"

    snapshot: ModelSnapshot
    calibration: CalibrationSet
    recipe: Recipe
    progress: bool = False  # bars on the terminal (the CLI)

    def identity(self) -> str:
        return run_fingerprint(self.snapshot, self.calibration, self.recipe)

    def _folder(self, settings: Settings) -> Path:
        return settings.root / "models" / self.snapshot.slug / self.recipe.fingerprint()[:16] / self.fingerprint

    def _result(self, out: Path, report: PruneReport) -> PrunedModel:
        return PrunedModel.from_report(out, self.fingerprint, self.recipe.fingerprint(), report)

    def local(self, settings: Settings) -> PrunedModel | None:
        out = self._folder(settings)
        report = finished_report(out)
        if report is None:
            return None
        log.info("reusing the finished prune of %s with %s", self.snapshot.spec, self.recipe.describe())
        return self._result(out, report)

    def pull(self, settings: Settings) -> PrunedModel | None:
        out = self._folder(settings)
        report = pull_finished(settings, f"pruned/{self.fingerprint}", out)
        return self._result(out, report) if report is not None else None

    def compute(self, settings: Settings) -> PrunedModel:
        run, out = self.fingerprint, self._folder(settings)
        log.info("pruning %s with %s (run %s)", self.snapshot.spec, self.recipe.describe(), run[:16])
        job = PruneJob(
            snapshot=self.snapshot,
            calibration=self.calibration,
            recipe=self.recipe,
            settings=settings,
            run=run,
            out=out,
            progress=self.progress,
        )
        report = _prune_structured(job) if self.recipe.structured else _prune(job)
        return self._result(out, report)

    def push(self, result: PrunedModel, settings: Settings) -> None:
        push_folder(settings, f"pruned/{result.fingerprint}", Path(result.path))

    def intact(self, result: PrunedModel) -> bool:
        return made_folder_intact(result.path, result.content)


def made_folder_intact(path: str, content: str) -> bool:
    """Whether a made model's folder is here with the report (and so every file) it was made with."""
    return bool(content) and finished_report(Path(path), content) is not None


def prune_with_checkpoints(
    snapshot: ModelSnapshot, calibration: CalibrationSet, recipe: Recipe, settings: Settings, progress: bool = False
) -> PrunedModel:
    """Prune one (model, calibration, recipe); a rerun resumes from the last valid block checkpoint."""
    stage = PruneStage(snapshot=snapshot, calibration=calibration, recipe=recipe, progress=progress)
    return run_stage(stage, settings)


def pull_finished(settings: Settings, key: str, out: Path) -> PruneReport | None:
    """A finished folder another machine stored under `key`, moved into `out` once it checks out."""
    staging = staging_folder(out)
    report = finished_report(staging, remember=False) if pull_folder(settings, key, staging) else None
    if report is None:
        shutil.rmtree(staging, ignore_errors=True)
        return None
    replace_with(staging, out)
    record_stamps(out, {**report.sha256, REPORT_FILE: report_digest(out)})
    return report


def commit_folder(staging: Path, out: Path, report: PruneReport, seconds: float | None = None) -> PruneReport:
    """Files synced and hashed, then the report completed (each file's size and sha256; `seconds`, what making
    it took, else the report's own) and written last, then the folder moved into place and stamped as verified."""
    files = {p.relative_to(staging).as_posix(): p for p in sorted(staging.rglob("*")) if p.is_file()}
    files.pop(REPORT_FILE, None)
    for path in files.values():
        fsync_path(path)
    facts = FolderFacts(
        prune_seconds=report.prune_seconds if seconds is None else seconds,
        peak_rss_mib=peak_rss_mib(),
        peak_gpu_mib=peak_gpu_mib(),
        files={name: path.stat().st_size for name, path in files.items()},
        sha256=hash_files(staging, list(files)),
    )
    report = report.completed(facts)
    write_atomic(staging / REPORT_FILE, report.to_json())
    replace_with(staging, out)
    record_stamps(out, {**report.sha256, REPORT_FILE: report_digest(out)})
    return report


def staging_folder(out: Path) -> Path:
    """This process's staging folder for `out`; those of processes that are gone are removed."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return staging_path(out)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class PruneJob:
    """One prune being computed: its inputs, where its work and result go."""

    snapshot: ModelSnapshot
    calibration: CalibrationSet
    recipe: Recipe
    settings: Settings
    run: str  # its fingerprint
    out: Path  # the finished folder
    progress: bool

    def work(self, part: str) -> Path:
        """Its checkpoints' folder `part` (removed with the rest of its work once the folder is committed)."""
        return self.settings.root / "work" / self.run / part

    def provenance(self) -> Provenance:
        return Provenance(
            model=self.snapshot.spec,
            model_fingerprint=self.snapshot.fingerprint,
            run_fingerprint=self.run,
            calibration_fingerprint=self.calibration.fingerprint,
        )

    def load(self) -> tuple[torch.nn.Module, object, torch.Tensor]:
        """The dense model on the compute device, its tokenizer and the calibration windows."""
        settings = self.settings
        model, tokenizer = load_for_compute(self.snapshot.path, settings.device, settings.trust_remote_code)
        return model, tokenizer, load_calibration(self.calibration)

    def run_facts(self, **facts) -> RunFacts:
        """How this prune ran: `facts` (its resume) with the dtype its folder is saved in."""
        return RunFacts(dtype=_dtype_name(self.save_dtype()), **facts)

    def save_dtype(self) -> torch.dtype:
        return output_dtype(self.recipe.dtype, self.snapshot.path)

    def commit(self, staging: Path, report: PruneReport, started: float) -> PruneReport:
        """The finished folder in place with its report completed, and the job's work removed."""
        report = commit_folder(staging, self.out, report, seconds=time.perf_counter() - started)
        shutil.rmtree(self.work(""), ignore_errors=True)  # block, allocation and gradient checkpoints
        return report


def _allocation(job: PruneJob, model: torch.nn.Module, ids: torch.Tensor) -> list[float] | None:
    """OWL's per-block sparsity, computed once on the dense model and kept for a resume (None: uniform)."""
    if job.recipe.allocation == "uniform":
        return None
    checkpoint = StageCheckpoint(job.work("allocation"), job.run)
    saved = checkpoint.read()
    if saved is not None:
        return saved[0]["block_sparsity"].tolist()
    block_sparsity = allocate_sparsity(model, ids, job.recipe, job.settings.device, job.progress)
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


def _prune_structured(job: PruneJob) -> PruneReport:
    """Width or depth pruning; its checkpoint is the importance statistics (the slow part), so a rerun skips
    that pass."""
    started, device = time.perf_counter(), job.settings.device
    checkpoint = StageCheckpoint(job.work("gradients"), job.run)
    model, tokenizer, ids = job.load()
    saved = checkpoint.read()
    if saved is None:
        statistics = structured_statistics(model, ids, job.recipe, device, job.progress)
        checkpoint.write(statistics, {"seconds": time.perf_counter() - started})
    else:
        statistics = saved[0]
        log.info("resuming %s from checkpointed importance statistics", job.snapshot.spec)
    staging = staging_folder(job.out)
    report = prune_structured_to_folder(
        model,
        tokenizer,
        ids,
        job.recipe,
        staging,
        device=device,
        progress=job.progress,
        provenance=job.provenance(),
        statistics=statistics,
        save_dtype=job.save_dtype(),
        run=job.run_facts(resumed_gradients=saved is not None, environment=numeric_environment(device)),
    )
    return job.commit(staging, report, started)


def _resumed(resume) -> tuple[ResumedBlocks, dict[str, str] | None]:
    """What the checkpointed blocks measured, and the environment they were pruned in (None: no block)."""
    blocks = ResumedBlocks(
        errors={k: v for meta in resume.meta for k, v in meta["errors"].items()},
        experts={k: v for meta in resume.meta for k, v in meta.get("experts", {}).items()},
        refits={
            index: BlockReconstructionReport(**meta["reconstruction"])
            for index, meta in enumerate(resume.meta)  # blocks 0 .. start_block - 1, in order
            if meta.get("reconstruction") is not None
        },
    )
    return blocks, resume.meta[-1].get("environment") if resume.meta else None


def _block_checkpoints(job: PruneJob) -> BlockCheckpoints:
    """Under the job's work; mirrored to the artifact store where the settings say (a pool)."""
    mirror = job.settings.artifact_store() if job.settings.mirror_checkpoints else None
    return BlockCheckpoints(job.work("checkpoints"), job.run, mirror, f"checkpoints/{job.run}")


def _prune(job: PruneJob) -> PruneReport:
    started, settings = time.perf_counter(), job.settings
    checkpoints = _block_checkpoints(job)
    model, tokenizer, ids = job.load()
    block_sparsity = _allocation(job, model, ids)
    resume = checkpoints.resume_point()
    if resume.start_block:
        restore_blocks(model, [checkpoints.load_weights(path) for path in resume.block_weights])
        log.info("resuming %s at block %d of a checkpointed prune", job.snapshot.spec, resume.start_block)
    resumed, earlier = _resumed(resume)
    environment = numeric_environment(settings.device)
    if earlier is not None and earlier != environment:
        log.warning(
            "resuming %s: blocks before %d were pruned with %s, the rest with %s",
            job.snapshot.spec,
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

    staging = staging_folder(job.out)
    report = prune_to_folder(
        model,
        tokenizer,
        ids,
        job.recipe,
        staging,
        settings.device,
        progress=job.progress,
        provenance=job.provenance(),
        start_block=resume.start_block,
        start_inputs=resume.inputs,
        on_block=on_block,
        block_sparsity=block_sparsity,
        forward_budget_mib=settings.forward_budget_mib,
        save_dtype=job.save_dtype(),
        run=job.run_facts(
            resumed_from_block=resume.start_block,
            environment=environment,
            resumed_environment=earlier if earlier != environment else None,
        ),
        resumed=resumed,
    )
    report = job.commit(staging, report, started)
    checkpoints.clear()  # the mirrored ones in the store too
    return report
