"""OWL layer-wise sparsity and LoRA recovery after structured pruning."""

from __future__ import annotations

import json

import pytest
import torch

from pruning_core.data import calibration_windows, read_rows, tokenize_text
from pruning_core.job import allocate_sparsity, prune_to_folder, recover_to_folder
from pruning_core.owl import outlier_fractions, owl_sparsities
from pruning_core.perplexity import perplexity
from pruning_core.recipe import Recipe
from pruning_core.recovery import RecoverySpec, TrainingState, recover
from pruning_core.structured.llm_pruner import StructuredSettings, prune_structured
from tests.conftest import WIKITEXT_TEST, WIKITEXT_VALID, tiny_model

# LLM-Pruner's own setting: blocks kept whole at the ends, the ratio counting all parameters.
PER_BLOCK = {"ratio_of": "all", "widths": "per_block"}

IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))


def test_owl_sparsities_keep_the_mean_and_favour_outlier_blocks():
    fractions = [0.010, 0.030, 0.020, 0.002]
    sparsities = owl_sparsities(fractions, 0.7, 0.08)
    assert sum(sparsities) / 4 == pytest.approx(0.7, abs=1e-12)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)
    order = sorted(range(4), key=lambda i: sparsities[i])
    assert order == sorted(range(4), key=lambda i: -fractions[i])  # more outliers, lower sparsity
    assert owl_sparsities([0.1, 0.1], 0.5, 0.08) == [0.5, 0.5]


def test_owl_prunes_blocks_with_outliers_less_and_hits_the_mean(tmp_path, tiny_tokenizer):
    model = tiny_model("llama")
    with torch.no_grad():  # block 1 gets a few very large weights: outliers in |W| * ||X||
        for linear in model.model.layers[1].modules():
            if isinstance(linear, torch.nn.Linear):
                linear.weight.view(-1)[::13] *= 100
    fractions = outlier_fractions(model, IDS, m=5.0, progress=False)
    assert fractions[1] == max(fractions) > min(fractions) > 0
    recipe = Recipe(method="wanda", sparsity=0.6, allocation="owl", calibration_samples=4, seq_len=32)
    sparsities = allocate_sparsity(model, IDS, recipe, progress=False)
    assert sparsities[1] == min(sparsities) and max(sparsities) - min(sparsities) == pytest.approx(0.16)
    assert sum(sparsities) / 3 == pytest.approx(0.6, abs=1e-12)
    report = prune_to_folder(model, tiny_tokenizer, IDS, recipe, tmp_path, progress=False, block_sparsity=sparsities)
    per_block = [sum(v for k, v in report.layers.items() if k.startswith(f"model.layers.{i}.")) / 7 for i in range(3)]
    for achieved, wanted in zip(per_block, sparsities, strict=True):
        assert achieved == pytest.approx(wanted, abs=0.01)
    assert report.total == pytest.approx(0.6, abs=0.01)
    assert json.loads((tmp_path / "sparsity.json").read_text())["block_sparsity"] == sparsities


def test_owl_recipe_validation():
    with pytest.raises(ValueError, match="N:M"):
        Recipe(method="wanda", pattern="2:4", allocation="owl")
    with pytest.raises(ValueError, match="structured"):
        Recipe(method="wanda", sparsity=0.5, ratio=0.2)
    with pytest.raises(ValueError, match="not sparsity"):
        Recipe(method="llm_pruner", sparsity=0.5)
    with pytest.raises(ValueError, match="unstructured"):
        Recipe(method="llm_pruner", ratio=0.2, allocation="owl")
    assert Recipe(method="llm_pruner", ratio=0.2).describe() == "20% of decoder parameters (width)"
    with pytest.raises(ValueError, match="2λ"):  # one outlier-heavy block could get a negative sparsity
        Recipe(method="wanda", sparsity=0.15, allocation="owl")
    with pytest.raises(ValueError, match="'keep_first' applies to llm_pruner only"):
        Recipe(method="wanda", sparsity=0.5, keep_first=2)
    with pytest.raises(ValueError, match="'owl_m' applies to allocation 'owl' only"):
        Recipe(method="wanda", sparsity=0.5, owl_m=3)
    old = Recipe(method="wanda", sparsity=0.5)
    assert (
        "allocation" not in old.canonical_json()
        and "owl" in Recipe(method="wanda", sparsity=0.5, allocation="owl").canonical_json()
    )


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _pruned(trained_tiny):
    model = tiny_model("llama")
    model.load_state_dict(trained_tiny[0].state_dict())
    calibration = calibration_windows(trained_tiny[1], 8, 64, seed=99)
    prune_structured(
        model, calibration, StructuredSettings(ratio=0.2, **PER_BLOCK, keep_first=0, keep_last=0), progress=False
    )
    return model


def test_lora_recovery_lowers_perplexity_and_merges(trained_tiny, tiny_tokenizer, tmp_path):
    test_ids = tokenize_text(tiny_tokenizer, read_rows(str(WIKITEXT_TEST))[:400])
    dense = perplexity(trained_tiny[0], test_ids, 64, progress=False).perplexity
    model = _pruned(trained_tiny)
    before = perplexity(model, test_ids, 64, progress=False).perplexity
    spec = RecoverySpec(data=str(WIKITEXT_VALID), steps=40, learning_rate=2e-3, batch_size=8, seq_len=64)
    rows = read_rows(str(WIKITEXT_VALID))[:3000]
    merged, result = recover_to_folder(model, tiny_tokenizer, rows, spec, tmp_path, progress=False)
    after = perplexity(merged, test_ids, 64, progress=False).perplexity
    assert dense < before and after < 0.97 * before, (dense, before, after)
    assert len(result.losses) == 40
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not [name for name, _ in merged.named_modules() if "lora" in name.lower()]
    assert not [k for k in merged.state_dict() if "lora" in k or "base_layer" in k]
    assert list(tmp_path.glob("*.safetensors"))


def test_recovery_resumes_to_identical_weights(trained_tiny):
    spec = RecoverySpec(data=str(WIKITEXT_VALID), steps=6, learning_rate=1e-3, batch_size=2, seq_len=32)
    tokens = trained_tiny[1]
    straight, _ = recover(_pruned(trained_tiny), tokens, spec, progress=False)
    saved: list[TrainingState] = []
    recover(_pruned(trained_tiny), tokens, spec, progress=False, on_checkpoint=saved.append, checkpoint_every=4)
    assert [s.step for s in saved] == [4]
    resumed, result = recover(_pruned(trained_tiny), tokens, spec, progress=False, start=saved[0])
    assert result.resumed_from_step == 4 and len(result.losses) == 6
    for name, tensor in _state(straight).items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
