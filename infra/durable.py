"""Writes a crash cannot tear: temp file in the same folder, fsync, rename, fsync the folder.

Readers of such files see the old content or the new, never half of either. A JSON cache that is
torn anyway (written by an older version, or a disk that lied) reads as absent, so it is rebuilt
instead of failing every later run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def fsync_path(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def staging_path(target: Path) -> Path:
    """This process's staging name beside `target` (`.<name>.tmp-<pid>`), cleared of an earlier attempt's."""
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if staging.is_dir():
        shutil.rmtree(staging)
    else:
        staging.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    return staging


def replace_with(staging: Path, target: Path) -> None:
    """`staging` (a file or a folder whose files are synced) renamed over `target`, then their folder synced:
    a reader sees the old `target` or the new, never a mix."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(staging, target)
    fsync_path(target.parent)


def _replace_from_temp(target: Path, fill) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace `path` with `data` (text is written as UTF-8) all at once."""
    payload = data.encode() if isinstance(data, str) else data
    _replace_from_temp(Path(path), lambda out: out.write(payload))


def atomic_copy(source: Path, target: Path) -> None:
    """Copy `source` over `target` all at once."""

    def fill(out) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, out, 8 * 1024 * 1024)

    _replace_from_temp(Path(target), fill)


def read_json(path: str | Path) -> Any | None:
    """The JSON in `path`; None when the file is absent, unreadable or torn (logged)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        log.warning("ignoring unreadable %s (%s); it will be rebuilt", path, error)
        return None
