"""Run one checkpointed prune in its own process (the SIGKILL resume test kills it mid-prune).

usage: python -m tests.workers.prune_worker MODEL_DIR CALIBRATION_TEXT RECIPE_JSON
(SECATEUR_HOME from the environment)
"""

from __future__ import annotations

import sys

from infra.settings import Settings
from pruning_core.recipe import Recipe
from tasks.calibrate import CalibrationSpec, make_calibration
from tasks.fetch import snapshot_model
from tasks.prune import prune_with_checkpoints

WORKER_CALIBRATION = {"samples": 32, "seq_len": 128, "seed": 0}


def run(model_dir: str, data: str, recipe: Recipe) -> object:
    settings = Settings()
    snapshot = snapshot_model(model_dir, settings)
    calibration = make_calibration(snapshot, CalibrationSpec(data=data, **WORKER_CALIBRATION), settings)
    return prune_with_checkpoints(snapshot, calibration, recipe, settings)


if __name__ == "__main__":
    result = run(sys.argv[1], sys.argv[2], Recipe.model_validate_json(sys.argv[3]))
    print(result.model_dump_json())
