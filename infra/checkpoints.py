"""Block checkpoints of a prune: atomic, verified, refused when they belong to another run.

Layout under the run's folder: `block-0007/{weights.safetensors, inputs.safetensors, checkpoint.json}`.
`checkpoint.json` names the run fingerprint, the block and the sha256 of each file. A block folder is
written under a temporary name, fsynced, then renamed, so a crash leaves either the whole block or
nothing. Only the inputs of the last two blocks are kept: resuming needs the inputs of one block,
the weights of all blocks before it.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from infra.artifacts import ArtifactStore, ArtifactStoreError
from infra.durable import fsync_path, replace_with, staging_path
from infra.hashing import sha256_file

log = logging.getLogger(__name__)

WEIGHTS, INPUTS, RECORD = "weights.safetensors", "inputs.safetensors", "checkpoint.json"
KEEP_INPUTS = 2


class CheckpointRefused(ValueError):
    pass


@dataclass
class ResumePoint:
    """Start at `start_block` with `inputs`, after loading the weights of blocks `0..start_block-1`."""

    start_block: int = 0
    inputs: torch.Tensor | None = None
    block_weights: list[Path] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)


class BlockCheckpoints:
    def __init__(self, folder: str | Path, fingerprint: str, mirror: ArtifactStore | None = None, key: str = ""):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.mirror = mirror
        self.key = key

    def block_dir(self, index: int) -> Path:
        return self.folder / f"block-{index:04d}"

    def write(self, index: int, weights: dict[str, torch.Tensor], next_inputs: torch.Tensor, meta: dict) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.block_dir(index)
        temp = staging_path(final)
        temp.mkdir()
        save_file({k: v.contiguous() for k, v in weights.items()}, temp / WEIGHTS)
        save_file({"inputs": next_inputs.contiguous()}, temp / INPUTS)
        record = {
            "fingerprint": self.fingerprint,
            "block": index,
            "files": {name: sha256_file(temp / name) for name in (WEIGHTS, INPUTS)},
            "meta": meta,
        }
        (temp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
        for name in (WEIGHTS, INPUTS, RECORD):
            fsync_path(temp / name)
        replace_with(temp, final)  # over a refused checkpoint of this block, if any
        stale = self.block_dir(index - KEEP_INPUTS) / INPUTS
        stale.unlink(missing_ok=True)
        if self.mirror is not None:
            self._mirror(index)
        return final

    def _mirror(self, index: int) -> None:
        try:
            self.mirror.put_folder(self.block_dir(index), f"{self.key}/{self.block_dir(index).name}", mutable=True)
            self.mirror.delete_prefix(f"{self.key}/{self.block_dir(index - KEEP_INPUTS).name}/{INPUTS}")
        except ArtifactStoreError as error:  # the local checkpoint is what resume relies on
            log.warning("checkpoint mirror failed for block %d: %s", index, error)

    def _check(self, index: int, folder: Path, need_inputs: bool) -> dict[str, Any]:
        record_path = folder / RECORD
        if not record_path.is_file():
            raise CheckpointRefused("no checkpoint.json")
        try:
            record = json.loads(record_path.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointRefused(f"unreadable checkpoint.json ({error.msg})") from error
        if record.get("fingerprint") != self.fingerprint:
            raise CheckpointRefused(f"fingerprint {record.get('fingerprint')!r} is not this run's {self.fingerprint!r}")
        if record.get("block") != index:
            raise CheckpointRefused(f"records block {record.get('block')}, expected {index}")
        for name in (WEIGHTS, INPUTS) if need_inputs else (WEIGHTS,):
            path = folder / name
            if not path.is_file():
                raise CheckpointRefused(f"{name} is missing")
            if sha256_file(path) != record["files"].get(name):
                raise CheckpointRefused(f"{name} does not match its sha256 (truncated or altered)")
        return record

    def pull_mirror(self) -> None:
        """Fetch mirrored checkpoints when this machine has none (resume on another machine)."""
        if self.mirror is None or any(self.folder.glob("block-*")):
            return
        index = 0
        while self.mirror.read_manifest(f"{self.key}/{self.block_dir(index).name}") is not None:
            manifest = self.mirror.read_manifest(f"{self.key}/{self.block_dir(index).name}")
            wanted = set(manifest["files"]) & {WEIGHTS, RECORD, INPUTS}
            try:
                self.mirror.get_folder(f"{self.key}/{self.block_dir(index).name}", self.block_dir(index), wanted)
            except ArtifactStoreError:
                self.mirror.get_folder(
                    f"{self.key}/{self.block_dir(index).name}", self.block_dir(index), {WEIGHTS, RECORD}
                )
            index += 1
        if index:
            log.info("fetched %d mirrored checkpoints from %s", index, self.mirror.url(self.key))

    def resume_point(self) -> ResumePoint:
        """The latest block whose chain of checkpoints verifies; refused ones are logged and removed."""
        self.pull_mirror()
        records: list[dict[str, Any]] = []
        index = 0
        while self.block_dir(index).is_dir():
            try:
                records.append(self._check(index, self.block_dir(index), need_inputs=False))
            except CheckpointRefused as reason:
                log.warning(
                    "refused checkpoint %s: %s; recomputing from block %d", self.block_dir(index), reason, index
                )
                break
            index += 1
        resume = ResumePoint()
        for last in range(len(records) - 1, -1, -1):
            try:
                self._check(last, self.block_dir(last), need_inputs=True)
            except CheckpointRefused as reason:
                log.warning("cannot resume after block %d: %s", last, reason)
                continue
            inputs = load_file(self.block_dir(last) / INPUTS)["inputs"]
            resume = ResumePoint(
                last + 1,
                inputs,
                [self.block_dir(i) / WEIGHTS for i in range(last + 1)],
                [r["meta"] for r in records[: last + 1]],
            )
            break
        self._discard_from(resume.start_block)
        return resume

    def _discard_from(self, index: int) -> None:
        for folder in self.folder.glob("block-*"):
            if int(folder.name.removeprefix("block-")) >= index:
                shutil.rmtree(folder, ignore_errors=True)
        for temp in self.folder.glob(".block-*.tmp-*"):
            shutil.rmtree(temp, ignore_errors=True)

    def clear(self) -> None:
        """A finished prune needs no checkpoints (kept after a failure, removed after success)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.mirror is not None:
            try:
                self.mirror.delete_prefix(self.key)
            except ArtifactStoreError as error:
                log.warning("could not remove mirrored checkpoints: %s", error)

    @staticmethod
    def load_weights(path: Path) -> dict[str, torch.Tensor]:
        return load_file(path)
