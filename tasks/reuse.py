"""Cached results checked before use, and fetched from the artifact store where this machine lacks them.

Prefect's cache record (in the store on a pool) says a calibration set, pruned or recovered model exists;
its path is under `$SECATEUR_HOME` of whichever machine reads it. `intact` says whether the files there
are the bytes that were made (sha256 recorded at creation); where they are not, the files come from the
store's `cache/` (verified) under the same lock that guards making them -- nothing is computed, and the
stage stays Cached. Otherwise the caller computes the result again.
"""

from __future__ import annotations

from pathlib import Path

from infra.integrity import file_intact
from infra.locks import exclusive
from infra.settings import Settings
from tasks.calibrate import CalibrationSet, shared_key, valid_calibration
from tasks.prune import PrunedModel, finished_report, pull_finished
from tasks.recover import RecoveredModel
from tasks.shared import pull_file

_FOLDERS = {PrunedModel: ("prune", "pruned"), RecoveredModel: ("recover", "recovered")}


def intact(value: object) -> bool:
    """Whether the files a cached result names are here with the sha256 recorded when they were made."""
    if isinstance(value, CalibrationSet):
        return file_intact(Path(value.path), value.sha256 or None)
    if isinstance(value, PrunedModel | RecoveredModel):
        return bool(value.content) and finished_report(Path(value.path), value.content) is not None
    return True  # the result is its own value (an evaluation, a snapshot's record)


def fetch_stored(value: object, settings: Settings) -> bool:
    """True once the files `value` names are here intact (fetched now or already there); False: compute them."""
    if not settings.share_results:
        return False
    locks, path = settings.path("locks"), Path(value.path)
    if isinstance(value, CalibrationSet):
        with exclusive(locks, f"calibration-{value.fingerprint}"):
            return intact(value) or (
                pull_file(settings, shared_key(value.fingerprint), path)
                and valid_calibration(path, value.fingerprint)
                and file_intact(path, value.sha256 or None, full=True)
            )
    kind = next((names for cls, names in _FOLDERS.items() if isinstance(value, cls)), None)
    if kind is None:
        return False
    lock, folder = kind
    with exclusive(locks, f"{lock}-{value.fingerprint}"):
        if intact(value):
            return True
        report = pull_finished(settings, f"{folder}/{value.fingerprint}", path)
        return report is not None and intact(value)


def measured_identity(value: PrunedModel | RecoveredModel) -> str:
    """What an evaluation of a made model is keyed by: its inputs and the bytes they gave (two machines may
    make different bytes from the same inputs, and each evaluation describes its own)."""
    return f"{value.fingerprint}-{value.content[:16]}"
