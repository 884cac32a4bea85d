"""A single-stage checkpoint: a set of tensors plus JSON metadata, written atomically and verified.

Used where a step's resume point is one state rather than a chain of blocks (the gradient statistics
of a structured prune, the training state of a LoRA recovery). Layout: `<folder>/{tensors.safetensors,
checkpoint.json}`; `checkpoint.json` names the run fingerprint and the sha256 of the tensor file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from infra.checkpoints import CheckpointRefused, fsync_path
from infra.hashing import sha256_file

log = logging.getLogger(__name__)

TENSORS, RECORD = "tensors.safetensors", "checkpoint.json"


class StageCheckpoint:
    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def write(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        temp = self.folder.with_name(f".{self.folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, temp / TENSORS)
        record = {"fingerprint": self.fingerprint, "sha256": sha256_file(temp / TENSORS), "meta": meta}
        (temp / RECORD).write_text(json.dumps(record, sort_keys=True))
        for name in (TENSORS, RECORD):
            fsync_path(temp / name)
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(temp, self.folder)
        fsync_path(self.folder.parent)

    def _check(self) -> dict[str, Any]:
        try:
            record = json.loads((self.folder / RECORD).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointRefused(f"unreadable {RECORD} ({error})") from error
        if record.get("fingerprint") != self.fingerprint:
            raise CheckpointRefused(f"fingerprint {record.get('fingerprint')!r} is not this run's {self.fingerprint!r}")
        tensors = self.folder / TENSORS
        if not tensors.is_file() or sha256_file(tensors) != record.get("sha256"):
            raise CheckpointRefused(f"{TENSORS} is missing or does not match its sha256")
        return record

    def read(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The saved (tensors, meta), or None when there is none or it is refused (logged, then removed)."""
        if not self.folder.is_dir():
            return None
        try:
            record = self._check()
        except CheckpointRefused as reason:
            log.warning("refused checkpoint %s: %s; starting this stage over", self.folder, reason)
            self.clear()
            return None
        return load_file(self.folder / TENSORS), record["meta"]

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
