"""A cached result whose files another machine made: fetched from the artifact store into this state dir.

Prefect's cache record (in the store on a pool) says a calibration set, pruned or recovered model exists;
its path is under `$SECATEUR_HOME` of whichever machine reads it. Where that path is empty here, the files
come from the store's `cache/` (manifest-verified) under the same lock that guards making them -- nothing
is computed, and the stage stays Cached.
"""

from __future__ import annotations

from pathlib import Path

from infra.locks import exclusive
from infra.settings import Settings
from tasks.calibrate import CalibrationSet, shared_key, valid_calibration
from tasks.prune import PrunedModel, pull_finished
from tasks.recover import RecoveredModel
from tasks.shared import pull_file


def fetch_stored(value: object, settings: Settings) -> bool:
    """True once the files `value` names are here (fetched now or already there); False: compute them."""
    if not settings.share_results:
        return False
    locks, path = settings.path("locks"), Path(value.path)
    if isinstance(value, CalibrationSet):
        with exclusive(locks, f"calibration-{value.fingerprint}"):
            return valid_calibration(path, value.fingerprint) or (
                pull_file(settings, shared_key(value.fingerprint), path) and valid_calibration(path, value.fingerprint)
            )
    kinds = {PrunedModel: ("prune", "pruned"), RecoveredModel: ("recover", "recovered")}
    kind = next((names for cls, names in kinds.items() if isinstance(value, cls)), None)
    if kind is None:
        return False
    lock, folder = kind
    with exclusive(locks, f"{lock}-{value.fingerprint}"):
        return path.is_dir() or pull_finished(settings, f"{folder}/{value.fingerprint}", path) is not None
