"""Recipe validation, YAML loading, canonical JSON and fingerprint."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pruning_core.recipe import Recipe, describe_validation_error


def error_line(**fields) -> str:
    with pytest.raises(ValidationError) as info:
        Recipe(**fields)
    return describe_validation_error(info.value)


def test_invalid_values_name_the_field_and_the_allowed_range():
    assert "sparsity" in error_line(method="wanda", sparsity=1.5) and "less than 1" in error_line(
        method="wanda", sparsity=1.5
    )
    line = error_line(method="pruneit", sparsity=0.5)
    assert line.startswith("invalid recipe: method: unknown method 'pruneit'")
    assert "apt, depth, llm_pruner, magnitude, sparsegpt, wanda" in line
    assert "N < M" in error_line(method="apt", pattern="4:2")
    assert "exactly one of 'sparsity'" in error_line(method="apt", pattern="2:4", sparsity=0.5)
    assert "exactly one of 'sparsity'" in error_line(method="apt")
    assert "damping" in error_line(method="apt", sparsity=0.5, damping=0)
    assert "layer_sparsity" in error_line(method="apt", sparsity=0.5, layer_sparsity={"*.q_proj": 1.2})
    assert "colour" in error_line(method="apt", sparsity=0.5, colour="red")


def test_fingerprint_is_stable_and_tracks_every_field(tmp_path):
    recipe = Recipe(method="apt", pattern="2:4")
    again = Recipe.model_validate_json(recipe.canonical_json())
    assert again.fingerprint() == recipe.fingerprint()
    assert len(recipe.fingerprint()) == 64
    assert Recipe(method="apt", pattern="2:4", seed=1).fingerprint() != recipe.fingerprint()
    assert Recipe(method="apt", pattern="4:8").fingerprint() != recipe.fingerprint()
    path = tmp_path / "r.yaml"
    path.write_text("method: apt\npattern: '2:4'\n")
    assert Recipe.from_yaml(path).fingerprint() == recipe.fingerprint()


def test_overrides_replace_the_target_of_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: sparsegpt\nsparsity: 0.6\nblock_size: 64\nskip: ['*.down_proj']\n")
    recipe = Recipe.with_overrides(Recipe.read_yaml(path), {"pattern": "2:4", "seed": 3, "method": None})
    assert recipe.pattern == "2:4" and recipe.sparsity is None
    assert recipe.method == "sparsegpt" and recipe.block_size == 64 and recipe.seed == 3
    assert recipe.target.is_nm and recipe.target.fraction == 0.5


def test_recipe_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe file not found"):
        Recipe.read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        Recipe.read_yaml(bad)
