"""recover: distillation from the dense model (or LoRA on next-token loss) of a structurally pruned model,
checkpointed so a rerun continues where it stopped."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel

from infra.hashing import fingerprint
from infra.settings import Settings, StatePath
from infra.stage_checkpoint import StageCheckpoint
from pruning_core.data import read_rows
from pruning_core.distill import DistillSpec
from pruning_core.job import recover_to_folder
from pruning_core.modeling import load_for_compute, storage_dtype
from pruning_core.recovery import RecoverySpec, TrainingState
from pruning_core.report import PruneReport, RecoveryReport
from tasks.calibrate import data_identity
from tasks.fetch import ModelSnapshot
from tasks.prune import (
    PrunedModel,
    commit_folder,
    finished_report,
    made_folder_intact,
    pull_finished,
    report_digest,
    staging_folder,
)
from tasks.shared import push_folder
from tasks.stage import Stage, run_stage

log = logging.getLogger(__name__)

# Bump when recovery's output changes (per kind, so that one kind's change keeps the other's results).
RECOVERY_VERSION = {"lora": "1", "distill": "2"}  # distill 2: the loss from final hidden states in chunks
CHECKPOINT_EVERY = 25  # steps between training-state checkpoints

RecoveryKind = RecoverySpec | DistillSpec


class RecoveredModel(BaseModel):
    path: StatePath
    fingerprint: str  # of (pruned model, recovery spec, data, code version)
    content: str = ""  # sha256 of the folder's report (which holds every file's sha256)
    steps: int
    tokens: int = 0  # trained on: steps x batch_size x seq_len
    losses: list[float]
    seconds: float
    resumed_from_step: int = 0
    heldout: dict[int, float] = {}  # distillation: step -> held-out perplexity (step 0: before training)
    precision: str = "float32"  # what the training's forward passes ran in


def recovery_fingerprint(pruned: PrunedModel, spec: RecoveryKind) -> str:
    """The teacher of a distillation is the dense model the pruned one came from: `pruned` names it."""
    return fingerprint(
        {
            "pruned": pruned.fingerprint,
            "spec": spec.model_dump(mode="json"),
            "data": data_identity(spec.data),
            "code": RECOVERY_VERSION[spec.kind],
        }
    )


def _state_tensors(state: TrainingState) -> dict:
    return {
        **{f"adapter.{k}": v for k, v in state.adapter.items()},
        **{f"optimizer.{k}": v for k, v in state.optimizer.items()},
    }


def _state_from(tensors: dict, meta: dict) -> TrainingState:
    def part(prefix: str) -> dict:
        return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

    heldout = {int(step): value for step, value in meta.get("heldout", {}).items()}
    return TrainingState(
        meta["step"], meta["losses"], part("adapter."), part("optimizer."), meta["optimizer_groups"], heldout
    )


class RecoverStage(Stage[RecoveredModel]):
    """Recovery training of a pruned model: a folder beside it, checkpointed every few steps."""

    kind: ClassVar[str] = "recover"
    task_name: ClassVar[str] = "recover"

    pruned: PrunedModel
    spec: RecoveryKind
    teacher: ModelSnapshot  # the dense model (distillation's teacher)
    progress: bool = False

    def identity(self) -> str:
        return recovery_fingerprint(self.pruned, self.spec)

    def folder(self) -> Path:
        pruned = Path(self.pruned.path)
        return pruned.with_name(f"{pruned.name}-recovered-{self.fingerprint[:16]}")

    def _result(self, report: PruneReport | None) -> RecoveredModel | None:
        if report is None or report.recovery is None:
            return None
        out, recovery = self.folder(), report.recovery
        return RecoveredModel(
            path=str(out),
            fingerprint=self.fingerprint,
            content=report_digest(out),
            steps=self.spec.steps,
            tokens=self.spec.steps * self.spec.batch_size * self.spec.seq_len,
            losses=recovery.losses,
            seconds=recovery.seconds,
            resumed_from_step=recovery.resumed_from_step,
            heldout=recovery.heldout,
            precision=recovery.precision,
        )

    def local(self, settings: Settings) -> RecoveredModel | None:
        return self._result(finished_report(self.folder()))

    def pull(self, settings: Settings) -> RecoveredModel | None:
        return self._result(pull_finished(settings, f"recovered/{self.fingerprint}", self.folder()))

    def compute(self, settings: Settings) -> RecoveredModel:
        return self._result(_recover(self, settings))

    def push(self, result: RecoveredModel, settings: Settings) -> None:
        push_folder(settings, f"recovered/{result.fingerprint}", Path(result.path))

    def intact(self, result: RecoveredModel) -> bool:
        return made_folder_intact(result.path, result.content)


def recover_with_checkpoints(
    pruned: PrunedModel, spec: RecoveryKind, settings: Settings, teacher: ModelSnapshot, progress: bool = False
) -> RecoveredModel:
    stage = RecoverStage(pruned=pruned, spec=spec, teacher=teacher, progress=progress)
    return run_stage(stage, settings)


def _recover(stage: RecoverStage, settings: Settings) -> PruneReport:
    pruned, spec, run, out = stage.pruned, stage.spec, stage.fingerprint, stage.folder()
    started = time.perf_counter()
    pruned_report = finished_report(Path(pruned.path), pruned.content)
    if pruned_report is None:
        raise FileNotFoundError(f"{pruned.path}: the pruned model to recover is gone or incomplete")
    rows = read_rows(spec.data)  # a bad data spec fails before the model is loaded
    checkpoint = StageCheckpoint(settings.root / "work" / run / "recovery", run)
    saved = checkpoint.read()
    start = _state_from(*saved) if saved is not None else None
    if start is not None:
        log.info("resuming recovery of %s at step %d of %d", pruned.path, start.step, spec.steps)

    def on_checkpoint(state: TrainingState) -> None:
        meta = {
            "step": state.step,
            "losses": state.losses,
            "optimizer_groups": state.optimizer_groups,
            "heldout": {str(step): value for step, value in state.heldout.items()},
        }
        checkpoint.write(_state_tensors(state), meta)

    model, tokenizer = load_for_compute(pruned.path, settings.device, settings.trust_remote_code)
    dense = None
    if isinstance(spec, DistillSpec):
        dense, _ = load_for_compute(stage.teacher.path, settings.device, settings.trust_remote_code)
    staging = staging_folder(out)
    _, result = recover_to_folder(
        model,
        tokenizer,
        rows,
        spec,
        staging,
        device=settings.device,
        progress=stage.progress,
        start=start,
        on_checkpoint=on_checkpoint,
        checkpoint_every=CHECKPOINT_EVERY,
        save_dtype=storage_dtype(pruned.path),  # the pruned model's: the recipe chose it
        teacher=dense,
    )
    recovery = RecoveryReport(
        spec=spec.model_dump(mode="json"),
        fingerprint=run,
        losses=result.losses,
        seconds=time.perf_counter() - started,
        resumed_from_step=result.resumed_from_step,
        heldout=result.heldout,
        precision=result.precision,
    )
    report = commit_folder(staging, out, pruned_report.with_recovery(recovery))
    checkpoint.clear()
    return report
