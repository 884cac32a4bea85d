"""Results are reused only while their bytes are the ones made: sha256 at creation, verified at every reuse.

A result (a folder of files, or one file) is hashed once when it is made. Beside it a stamp file
(`.<name>.verified.json` in the same folder) keeps, per file, the sha256 and the size, mtime and inode
it had when it was last verified. A reuse verifies cheaply where all three are unchanged since then, and
hashes the file again otherwise; `full=True` (before publishing) always hashes. A file that differs from
the recorded sha256 makes the result unusable: the caller logs it and makes the result again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from infra.durable import read_json, write_atomic
from infra.hashing import sha256_file

log = logging.getLogger(__name__)


def stamp_path(base: Path) -> Path:
    return base.parent / f".{base.name}.verified.json"


def _stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def _stamps(base: Path) -> dict[str, dict]:
    saved = read_json(stamp_path(base))
    return saved.get("files", {}) if isinstance(saved, dict) and isinstance(saved.get("files"), dict) else {}


def record_stamps(base: Path, digests: dict[str, str]) -> None:
    """Remember that the files of `base` (a folder, or a file with the name "") had these sha256 just now."""
    files = {name: {"sha256": sha, "stat": _stat(base / name)} for name, sha in digests.items()}
    write_atomic(stamp_path(base), json.dumps({"files": files}, sort_keys=True))


def hash_files(base: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(base / name) for name in names}


def seal(base: Path, names: list[str]) -> dict[str, str]:
    """Hash the named files of `base` (made just now) and stamp them; their sha256 by name."""
    digests = hash_files(base, names)
    record_stamps(base, digests)
    return digests


def mismatch(base: Path, expected: dict[str, str], full: bool = False, remember: bool = True) -> str | None:
    """Why `base` does not hold exactly `expected` (name -> sha256), or None when every file matches.

    Unchanged files (size, mtime and inode as when last verified) are trusted without hashing unless `full`.
    With `remember`, files hashed here are stamped so the next check is cheap.
    """
    stamps = {} if full else _stamps(base)
    verified, hashed = {}, False
    for name, sha in expected.items():
        path = base / name
        if not path.is_file():
            return f"{path} is missing"
        stamp = stamps.get(name, {})
        if stamp.get("sha256") == sha and stamp.get("stat") == _stat(path):
            verified[name] = sha
            continue
        actual = sha256_file(path)
        hashed = True
        if actual != sha:
            return f"{path} does not match the sha256 recorded when it was made ({actual[:12]} != {sha[:12]})"
        verified[name] = sha
    if remember and hashed:
        record_stamps(base, verified)
    return None


def recorded_digest(path: Path) -> str | None:
    """The sha256 stamped for a single file `path` when it was made (None: never sealed here)."""
    return _stamps(path).get("", {}).get("sha256")


def file_intact(path: Path, sha256: str | None = None, full: bool = False) -> bool:
    """`path` holds the bytes it was sealed with (or `sha256` when given); logs why not."""
    expected = sha256 or recorded_digest(path)
    if not path.is_file():
        return False
    if expected is None:
        log.warning("%s has no sha256 recorded at creation; it is made again", path)
        return False
    problem = mismatch(path, {"": expected}, full)
    if problem:
        log.warning("%s; it is made again", problem)
    return problem is None


def sealed_text(text: str) -> str:
    """`text` with its sha256, for a copy kept where no stamp can follow it (the store's shared results)."""
    return json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(), "text": text})


def unsealed_text(sealed: str | None) -> str | None:
    """The text of `sealed_text`, or None where it is torn, altered or of another layout."""
    try:
        record = json.loads(sealed) if sealed else None
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        return None
    if hashlib.sha256(record["text"].encode()).hexdigest() != record.get("sha256"):
        log.warning("a shared result does not match its recorded sha256; it is made again")
        return None
    return record["text"]
