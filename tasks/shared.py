"""Results any machine of a pool may reuse, kept in the artifact store under `cache/` (`SECATEUR_SHARE_RESULTS`).

Calibration sets, evaluations and pruned (or recovered) model folders are looked up there before they are
computed and stored after, so another worker -- or a rerun elsewhere -- downloads instead of recomputing.
Pruned folders travel with their manifest (every file's sha256 checked on the way in); calibration sets
carry their fingerprint in their metadata; evaluations are validated JSON. A store that cannot be reached
only costs the reuse: the work is done locally and a warning logged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from infra.artifacts import ArtifactStore, ArtifactStoreError
from infra.hashing import sha256_file
from infra.settings import Settings

log = logging.getLogger(__name__)


def shared_store(settings: Settings) -> ArtifactStore | None:
    if not settings.share_results:
        return None
    return settings.artifact_store()


@contextlib.contextmanager
def _tolerated(what: str, failed: list[bool]) -> Iterator[None]:
    """A store error only costs the reuse: logged, and `failed` set for the caller."""
    try:
        yield
    except ArtifactStoreError as error:
        log.warning("%s: the artifact store did not serve it: %s", what, error)
        failed.append(True)


def pull_file(settings: Settings, key: str, local: Path) -> bool:
    """`cache/<key>` into `local` when it matches the sha256 its maker stored beside it; False where sharing
    is off, nobody stored it, or the copy differs (then `local` is removed)."""
    store, failed = shared_store(settings), []
    if store is None:
        return False
    local.parent.mkdir(parents=True, exist_ok=True)
    with _tolerated(key, failed):
        expected = store.read_text(f"cache/{key}.sha256")
        if expected is None or not store.exists(f"cache/{key}"):
            return False
        store.get_file(f"cache/{key}", local)
    if failed:
        return False
    if sha256_file(local) != expected.strip():
        log.warning("%s: the shared copy does not match its recorded sha256; it is made again", key)
        local.unlink(missing_ok=True)
        return False
    return True


def push_file(settings: Settings, key: str, local: Path, sha256: str) -> None:
    """`local` (whose sha256 was recorded when it was made) and that sha256 beside it."""
    store = shared_store(settings)
    if store is not None:
        with _tolerated(key, []):
            store.put_file(local, f"cache/{key}")
            store.write_text(f"cache/{key}.sha256", sha256)


def pull_text(settings: Settings, key: str) -> str | None:
    store, text = shared_store(settings), None
    if store is not None:
        with _tolerated(key, []):
            text = store.read_text(f"cache/{key}")
    return text


def push_text(settings: Settings, key: str, text: str) -> None:
    store = shared_store(settings)
    if store is not None:
        with _tolerated(key, []):
            store.write_text(f"cache/{key}", text)


def pull_folder(settings: Settings, key: str, local: Path) -> bool:
    """The folder stored under `cache/<key>` (manifest-verified) into `local`; False where there is none."""
    store, failed = shared_store(settings), []
    if store is None:
        return False
    with _tolerated(key, failed):
        if store.read_manifest(f"cache/{key}") is None:
            return False
        store.get_folder(f"cache/{key}", local)
    return not failed


def push_folder(settings: Settings, key: str, local: Path) -> None:
    store = shared_store(settings)
    if store is not None:
        with _tolerated(key, []):
            store.put_folder(local, f"cache/{key}")
