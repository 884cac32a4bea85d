"""Artifact store: one interface over a local folder (embedded default) and S3 (production).

An artifact is a folder of files under a key. Files go first, each verified and skipped when an
identical copy is already stored; `MANIFEST.json` (sha256 and size of every file) goes last, created
only where none exists, so a reader that finds the manifest finds a complete artifact, and what a
manifest committed is never overwritten (other bytes for the same key go under a content key).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from infra.durable import atomic_copy, write_atomic
from infra.hashing import folder_manifest, sha256_file
from infra.safe_paths import checked_key, path_inside

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"


class ArtifactStoreError(RuntimeError):
    """The store could not be reached or an artifact failed verification."""


class PermanentStoreError(ArtifactStoreError, ValueError):
    """A store error that a retry cannot fix (no such bucket, access denied, bad credentials): never retried."""


class ArtifactStore(ABC):
    """Folders in, folders out, content-verified."""

    uri: str

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    def put_folder(
        self,
        folder: str | Path,
        key: str,
        meta: dict[str, Any] | None = None,
        expected: dict[str, str] | None = None,
        mutable: bool = False,
    ) -> dict[str, Any]:
        """Store every file of `folder` under `key`, then the manifest; returns the manifest as stored.

        Once a manifest commits them, objects are immutable: the same content again is a no-op, other
        content goes under `<key>-<content digest>` (the manifest's `uri` says where). `expected` (name ->
        sha256 recorded when the folder was made) refuses, before anything is sent, a folder that changed.
        `mutable` keys (a checkpoint mirror, rewritten by a resume) are replaced instead.
        """
        files = folder_manifest(folder)
        for name, sha in (expected or {}).items():
            if files.get(name, {}).get("sha256") != sha:
                raise ArtifactStoreError(f"{Path(folder) / name}: not the bytes that were verified; nothing uploaded")
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        candidates = [key] if mutable else [key, f"{key}-{digest[:16]}"]
        for candidate in candidates:
            manifest = self._commit(Path(folder), candidate, files, meta or {}, mutable)
            if manifest is not None:
                return manifest
            log.warning("%s holds other bytes (committed before); these go under their content key", self.url(key))
        raise ArtifactStoreError(f"{self.url(candidates[-1])}: holds other bytes under this content's own key")

    def _commit(
        self, folder: Path, key: str, files: dict[str, Any], meta: dict[str, Any], mutable: bool
    ) -> dict[str, Any] | None:
        """The manifest of `files` at `key` (uploaded now or found there); None where `key` holds other content."""
        existing = self.read_manifest(key)
        if existing is not None and not mutable:
            return existing if existing.get("files") == files else None
        uploaded = sum(
            self._put_file(folder / relative, f"{key}/{relative}", entry["sha256"], entry["size"])
            for relative, entry in files.items()
        )
        manifest = {"files": files, "meta": meta, "uri": self.url(key)}
        text = json.dumps(manifest, indent=2, sort_keys=True)
        if mutable:
            if uploaded or self._read_text(f"{key}/{MANIFEST}") != text:
                self._write_text(f"{key}/{MANIFEST}", text)
        elif not self._create_text(f"{key}/{MANIFEST}", text):
            # Another publisher committed this key while we uploaded: its content wins the key.
            return self._commit(folder, key, files, meta, mutable)
        elif not all(self._holds(f"{key}/{relative}", entry["sha256"]) for relative, entry in files.items()):
            # A concurrent publisher overwrote an object between our upload and our commit.
            self.delete_prefix(f"{key}/{MANIFEST}")
            raise ArtifactStoreError(f"{self.url(key)}: objects changed while they were committed; publish again")
        log.info(
            "stored %s: %d files, %d uploaded, %d already present",
            self.url(key),
            len(files),
            uploaded,
            len(files) - uploaded,
        )
        return manifest

    def read_manifest(self, key: str) -> dict[str, Any] | None:
        """The committed manifest at `key` (None: none committed); a malformed one is an error naming it."""
        text = self._read_text(f"{key}/{MANIFEST}")
        if text is None:
            return None
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as error:
            raise PermanentStoreError(f"{self.url(key)}/{MANIFEST}: not valid JSON ({error})") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int)
            for entry in files.values()
        ):
            raise PermanentStoreError(f"{self.url(key)}/{MANIFEST}: not a manifest (needs files: name -> sha256, size)")
        return manifest

    def get_folder(self, key: str, dest: str | Path, only: set[str] | None = None) -> Path:
        """Download a complete artifact (or the files named in `only`) into `dest`, verified against the manifest."""
        manifest = self.read_manifest(key)
        if manifest is None:
            raise ArtifactStoreError(f"{self.url(key)}: no {MANIFEST} (missing or incomplete artifact)")
        dest = Path(dest)
        for relative in manifest["files"]:  # every entry checked before anything is written
            checked_key(relative)
        for relative, entry in manifest["files"].items():
            if only is not None and relative not in only:
                continue
            target = path_inside(dest, relative)
            if target.is_file() and target.stat().st_size == entry["size"] and sha256_file(target) == entry["sha256"]:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            self._get_file(f"{key}/{relative}", target)
            if sha256_file(target) != entry["sha256"]:
                raise ArtifactStoreError(f"{self.url(key)}/{relative}: checksum mismatch after download")
        return dest

    def read_text(self, key: str) -> str | None:
        """A small text object (a record, a heartbeat); None where there is none."""
        return self._read_text(checked_key(key))

    def write_text(self, key: str, text: str) -> None:
        """Replace a small text object whole (readers see the old or the new text)."""
        self._write_text(checked_key(key), text)

    def put_file(self, local: str | Path, key: str) -> None:
        """One file under `key` (skipped when an identical one is there)."""
        local = Path(local)
        self._put_file(local, checked_key(key), sha256_file(local), local.stat().st_size)

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether one object (a file, not a folder) is stored under `key`."""

    def get_file(self, key: str, local: str | Path) -> None:
        """One file from `key` into `local`, replacing it whole; the caller checks what it holds."""
        self._get_file(checked_key(key), Path(local))

    @abstractmethod
    def _put_file(self, local: Path, key: str, sha256: str, size: int) -> bool:
        """Store one file unless an identical one is there; True when bytes were sent."""

    @abstractmethod
    def _get_file(self, key: str, local: Path) -> None: ...

    @abstractmethod
    def _holds(self, key: str, sha256: str) -> bool:
        """Whether the object at `key` is the file with this sha256."""

    @abstractmethod
    def _create_text(self, key: str, text: str) -> bool:
        """Write a text object only where none exists (atomically); False where one already does."""

    @abstractmethod
    def _read_text(self, key: str) -> str | None: ...

    @abstractmethod
    def _write_text(self, key: str, text: str) -> None: ...

    @abstractmethod
    def delete_prefix(self, key: str) -> None: ...

    @abstractmethod
    def check(self) -> None:
        """Raise ArtifactStoreError unless the store answers and may be written."""


class FilesystemStore(ArtifactStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        """The file of `key`: a store folder may hold links or odd names, which are refused, never followed."""
        return path_inside(self.root, key)

    def _put_file(self, local: Path, key: str, sha256: str, size: int) -> bool:
        target = self._path(key)
        if target.is_file() and target.stat().st_size == size and sha256_file(target) == sha256:
            return False
        try:
            atomic_copy(local, target)
        except OSError as error:
            raise ArtifactStoreError(f"cannot write {target}: {error.strerror or error}") from error
        if sha256_file(target) != sha256:
            raise ArtifactStoreError(f"{target}: checksum mismatch after copy")
        return True

    def _get_file(self, key: str, local: Path) -> None:
        try:
            atomic_copy(self._path(key), local)
        except FileNotFoundError as error:
            raise ArtifactStoreError(f"{self.url(key)}: not in the store") from error

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _holds(self, key: str, sha256: str) -> bool:
        path = self._path(key)
        return path.is_file() and sha256_file(path) == sha256

    def _create_text(self, key: str, text: str) -> bool:
        target = self._path(key)
        temp = target.with_name(f".{target.name}.create-{os.getpid()}")
        write_atomic(temp, text)
        try:
            os.link(temp, target)  # fails where the target exists: the first publisher's manifest stays
        except FileExistsError:
            return False
        finally:
            temp.unlink(missing_ok=True)
        return True

    def _read_text(self, key: str) -> str | None:
        path = self._path(key)
        return path.read_text() if path.is_file() else None

    def _write_text(self, key: str, text: str) -> None:
        write_atomic(self._path(key), text)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise PermanentStoreError(f"cannot create {self.root}: {error.strerror or error}") from error
        if not os.access(self.root, os.W_OK):
            raise PermanentStoreError(f"{self.root} is not writable")

    def delete_prefix(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def open_store(location: str, attempts: int = 5, timeout_seconds: int = 10) -> ArtifactStore:
    """`s3://bucket/prefix` or a folder path."""
    if location.startswith("s3://"):
        from infra.s3 import S3Store

        return S3Store(location, attempts=attempts, timeout_seconds=timeout_seconds)
    if "://" in location and not location.startswith("file://"):
        raise ValueError(f"artifact store must be a folder or s3://bucket/prefix, got {location!r}")
    return FilesystemStore(location.removeprefix("file://"))
