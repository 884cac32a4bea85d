"""The calibration stage: token windows for a (model tokenizer, data spec), made once and shared."""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from infra.durable import fsync_path, replace_with, staging_path
from infra.hashing import fingerprint, sha256_file
from infra.integrity import file_intact, recorded_digest, seal
from infra.settings import Settings, StatePath
from pruning_core.data import calibration_windows, local_path, read_rows, tokenize_text
from pruning_core.modeling import load_tokenizer
from tasks.fetch import ModelSnapshot
from tasks.shared import pull_file, push_file
from tasks.stage import Stage, run_stage


class CalibrationSpec(BaseModel):
    """Where calibration text comes from and how many windows of how many tokens to draw."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field(description="text file, jsonl:PATH:FIELD or hf://dataset[/config]:split:field")
    samples: int = Field(default=128, ge=1, le=100000)
    seq_len: int = Field(default=2048, ge=8, le=131072)
    seed: int = Field(default=0, ge=0)


class CalibrationSet(BaseModel):
    path: StatePath
    fingerprint: str
    sha256: str = ""  # of the file, recorded when it was made
    samples: int
    seq_len: int
    seconds: float = 0.0


def data_identity(spec: str) -> str:
    """A local file is identified by its content; remote specs by their text."""
    path = local_path(spec)
    return sha256_file(path) if path is not None and path.is_file() else spec


def calibration_fingerprint(snapshot: ModelSnapshot, spec: CalibrationSpec) -> str:
    return fingerprint({"model": snapshot.fingerprint, "spec": spec.model_dump(), "data": data_identity(spec.data)})


class CalibrationStage(Stage[CalibrationSet]):
    """The token windows of (model tokenizer, data spec): one file under `calibration/`, shared as it is."""

    kind: ClassVar[str] = "calibration"
    task_name: ClassVar[str] = "build_calibration"

    snapshot: ModelSnapshot
    spec: CalibrationSpec

    def identity(self) -> str:
        return calibration_fingerprint(self.snapshot, self.spec)

    def _path(self, settings: Settings) -> Path:
        return settings.path("calibration") / f"{self.fingerprint}.safetensors"

    def _result(self, path: Path, sha256: str, started: float) -> CalibrationSet:
        return CalibrationSet(
            path=str(path),
            fingerprint=self.fingerprint,
            sha256=sha256,
            samples=self.spec.samples,
            seq_len=self.spec.seq_len,
            seconds=time.perf_counter() - started,
        )

    def local(self, settings: Settings) -> CalibrationSet | None:
        started, path = time.perf_counter(), self._path(settings)
        if file_intact(path) and valid_calibration(path, self.fingerprint):
            return self._result(path, recorded_digest(path), started)
        return None

    def pull(self, settings: Settings) -> CalibrationSet | None:
        started, path = time.perf_counter(), self._path(settings)
        if pull_file(settings, shared_key(self.fingerprint), path) and valid_calibration(path, self.fingerprint):
            return self._result(path, seal(path, [""])[""], started)  # matched the sha256 its maker recorded
        return None

    def compute(self, settings: Settings) -> CalibrationSet:
        started, path = time.perf_counter(), self._path(settings)
        tokenizer = load_tokenizer(self.snapshot.path, trust_remote_code=settings.trust_remote_code)
        _write_calibration(tokenizer, self.spec, self.fingerprint, path)
        return self._result(path, seal(path, [""])[""], started)

    def push(self, result: CalibrationSet, settings: Settings) -> None:
        push_file(settings, shared_key(result.fingerprint), Path(result.path), result.sha256)

    def intact(self, result: CalibrationSet) -> bool:
        return file_intact(Path(result.path), result.sha256 or None)


def make_calibration(snapshot: ModelSnapshot, spec: CalibrationSpec, settings: Settings) -> CalibrationSet:
    return run_stage(CalibrationStage(snapshot=snapshot, spec=spec), settings)


def _write_calibration(tokenizer, spec: CalibrationSpec, key: str, path: Path) -> None:
    rows = read_rows(spec.data)
    ids = calibration_windows(tokenize_text(tokenizer, rows), spec.samples, spec.seq_len, spec.seed)
    temp = staging_path(path)
    save_file({"input_ids": ids.contiguous()}, temp, metadata={"fingerprint": key, "data": spec.data})
    fsync_path(temp)
    replace_with(temp, path)


def shared_key(fingerprint: str) -> str:
    """Where the set is kept in the artifact store's shared results."""
    return f"calibration/{fingerprint}.safetensors"


def valid_calibration(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return (handle.metadata() or {}).get("fingerprint") == key
    except Exception:  # noqa: BLE001 - a damaged file is rebuilt
        return False


def load_calibration(calibration: CalibrationSet) -> torch.Tensor:
    return load_file(calibration.path)["input_ids"]
