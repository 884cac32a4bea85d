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

from infra.checkpoints import CheckpointRefused
from infra.durable import fsync_path, staging_path
from infra.hashing import sha256_file

log = logging.getLogger(__name__)

TENSORS, RECORD = "tensors.safetensors", "checkpoint.json"


class StageCheckpoint:
    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def write(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        temp = staging_path(self.folder)
        temp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, temp / TENSORS)
        record = {"fingerprint": self.fingerprint, "sha256": sha256_file(temp / TENSORS), "meta": meta}
        (temp / RECORD).write_text(json.dumps(record, sort_keys=True))
        for name in (TENSORS, RECORD):
            fsync_path(temp / name)
        # The previous state stays on disk (as `previous`) until the new one is in place.
        shutil.rmtree(self.previous, ignore_errors=True)
        if self.folder.exists():
            os.replace(self.folder, self.previous)
        os.replace(temp, self.folder)
        fsync_path(self.folder.parent)
        shutil.rmtree(self.previous, ignore_errors=True)

    @property
    def previous(self) -> Path:
        return self.folder.with_name(f".{self.folder.name}.previous")

    def _check(self, folder: Path) -> dict[str, Any]:
        try:
            record = json.loads((folder / RECORD).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointRefused(f"unreadable {RECORD} ({error})") from error
        if record.get("fingerprint") != self.fingerprint:
            raise CheckpointRefused(f"fingerprint {record.get('fingerprint')!r} is not this run's {self.fingerprint!r}")
        tensors = folder / TENSORS
        if not tensors.is_file() or sha256_file(tensors) != record.get("sha256"):
            raise CheckpointRefused(f"{TENSORS} is missing or does not match its sha256")
        return record

    def read(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The saved (tensors, meta), or None when there is none or it is refused (logged, then removed).

        A crash while a newer state was being swapped in leaves the older one as `previous`: it is used.
        """
        for folder in (self.folder, self.previous):
            if not folder.is_dir():
                continue
            try:
                record = self._check(folder)
            except CheckpointRefused as reason:
                log.warning("refused checkpoint %s: %s", folder, reason)
                continue
            return load_file(folder / TENSORS), record["meta"]
        if self.folder.is_dir() or self.previous.is_dir():
            log.warning("no usable checkpoint under %s; starting this stage over", self.folder.parent)
            self.clear()
        return None

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        shutil.rmtree(self.previous, ignore_errors=True)
