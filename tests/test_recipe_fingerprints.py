"""Recipes fingerprinted before their fields were grouped per method keep their fingerprints (and so every
cached prune, checkpoint and artifact key made from them)."""

from __future__ import annotations

import pytest

from pruning_core.recipe import Recipe

# (recipe, its fingerprint as recorded before the per-method settings; README.md: a file that exists)
RECORDED = [
    ({"method": "magnitude", "sparsity": 0.5}, "48ac3c6743275ba2c59c14ba8822adf3a11ea9475e1227886fa8b94eca5c8c87"),
    (
        {"method": "wanda", "sparsity": 0.5, "calibration_samples": 64, "seq_len": 512},
        "e3d073ea2671a72af4ad9717bb2cf3d055230d3bd89815e79e23228596cb2916",
    ),
    (
        {"method": "sparsegpt", "pattern": "2:4", "block_size": 64, "damping": 0.05},
        "396bc50456b40a2dae9ac8cd4e0e91751d382ac93725a2b3542d074c236b383e",
    ),
    (
        {"method": "sparsegpt", "sparsity": 0.7, "allocation": "owl", "owl_lambda": 0.1},
        "a0df38b56c1dee7e53e2a87d12f46de37cab772b4d12a3bd3039eb98d26a8ede",
    ),
    (
        {
            "method": "wanda",
            "sparsity": 0.5,
            "layer_sparsity": {"*.down_proj": 0.3},
            "skip": ["*.q_proj"],
            "true_sequential": True,
        },
        "1f680b71504cd05c38065d7dcddf542476b75ee5da49006916c263e7c010ab32",
    ),
    ({"method": "apt", "sparsity": 0.5}, "b6640450396fbabe60086801fd489191731842f987455e6407a72631f43b0a57"),
    (
        {"method": "apt", "pattern": "2:4", "refit": "exact", "mask_refinement": None},
        "e1bd60ea1777592985e1558d2e71004decf32f3ac033ffbf29ab3b07e3f94d0e",
    ),
    (
        {"method": "apt", "sparsity": 0.6, "refit_ridge": "heldout", "mask_refinement": None},
        "a53a5516952e98774e79cb1f8ab6cfb32e14062a7c87c91e9819bee319ffc63f",
    ),
    (
        {"method": "apt", "sparsity": 0.7, "mask_refinement": {"iterations": 20}, "dtype": "bfloat16"},
        "ab7f1a8a7423cd386cf60290f6b49cdbb2d7131b94eabc09368aac7c9a346412",
    ),
    (
        {"method": "wanda", "sparsity": 0.5, "block_reconstruction": {}},
        "c824bc31c4ac107eca34c833818125459bc884c170ff4707e4b41eab7ecff3bb",
    ),
    ({"method": "llm_pruner", "ratio": 0.2}, "273d905d12d46f02e04d20caaac6ba87b279923f03bfb2a40ac6e86443493c31"),
    (
        {
            "method": "llm_pruner",
            "ratio": 0.2,
            "widths": "per_block",
            "importance": "element2",
            "keep_first": 2,
            "recovery": {"data": "README.md", "steps": 10},
        },
        "3605fd1f6fb232fe29a9283e17c6ac5425f32e80801dd323d81cb04b1bddcb69",
    ),
    (
        {
            "method": "llm_pruner",
            "ratio": 0.3,
            "attention_unit": "kv_groups",
            "channel_refit": "none",
            "ratio_of": "all",
            "recovery": {"kind": "distill", "data": "README.md", "tokens": 100000},
        },
        "00653bdbd499136d77dac856eb365b6a93db23f836592f6e52d09ea423f9dbe2",
    ),
    (
        {"method": "depth", "ratio": 0.25, "depth_importance": "influence"},
        "46a8d1fb3f26b8829191bc4f0bcd37485425110fbe7bc32ad67e2caedaec5872",
    ),
]


@pytest.mark.parametrize(("fields", "recorded"), RECORDED)
def test_a_recipe_keeps_the_fingerprint_it_had(fields, recorded):
    assert Recipe.model_validate(fields).fingerprint() == recorded


def test_another_methods_field_is_refused_by_name_before_its_own_rules():
    with pytest.raises(ValueError, match="'refit_ridge' applies to apt only"):
        Recipe.model_validate({"method": "wanda", "sparsity": 0.5, "refit_ridge": "heldout"})
    with pytest.raises(ValueError, match="refit_ridge is for the conjugate-gradient refit"):
        Recipe.model_validate({"method": "apt", "sparsity": 0.5, "refit_ridge": "heldout"})


def test_two_perplexity_datasets_named_alike_are_refused(tmp_path):
    from tasks.evaluate import EvaluationSpec

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "wiki.txt").write_text("text\n")
    with pytest.raises(ValueError, match=r"named alike \(wiki\)"):
        EvaluationSpec(perplexity=[str(tmp_path / "a" / "wiki.txt"), str(tmp_path / "b" / "wiki.txt")])
