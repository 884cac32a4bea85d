"""Every decoder family a nightly batch holds, as tiny random models: the engine sees each block as the model does."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruning_core.adapters import adapter_for
from pruning_core.blocks import block_experts, capture_block_inputs, run_block
from pruning_core.engine import prune_model
from pruning_core.modeling import prunable_weight_names
from pruning_core.recipe import Recipe
from tests.conftest import FAMILY_CONFIGS, tiny_model

SEQ_LEN = 48  # three times the sliding windows of the tiny configs
MOE = {"mixtral", "qwen3_moe"}


def tokens(samples: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (samples, SEQ_LEN), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
@torch.no_grad()
def test_block_by_block_forward_reproduces_the_models_own_hidden_states(family):
    """The test that catches a wrong mask: each block fed what the engine captured gives the model's states."""
    model = tiny_model(family)
    blocks = adapter_for(model).blocks(model)
    ids = tokens(2)
    captured = capture_block_inputs(model, blocks, ids)
    reference = model(input_ids=ids, output_hidden_states=True).hidden_states
    hidden = captured.hidden
    # Most families list their embeddings first (Mamba does not); all list the final norm's output last.
    offset = 1 if torch.equal(hidden, reference[0]) else 0
    compared = 0
    for index, block in enumerate(blocks):
        hidden = run_block(block, hidden, captured.kwargs[index])
        if index + offset < len(reference) - 1:
            assert torch.allclose(hidden, reference[index + offset], atol=1e-5, rtol=1e-5), (family, index)
            compared += 1
    assert compared >= len(blocks) - 1


@torch.no_grad()
def test_block_0_arguments_replayed_to_a_full_attention_block_give_other_states():
    """Why arguments are captured per block: Gemma 3's full-attention blocks differ from its sliding ones."""
    model = tiny_model("gemma3_text")
    blocks = adapter_for(model).blocks(model)
    captured = capture_block_inputs(model, blocks, tokens(1))
    entering = run_block(blocks[0], captured.hidden, captured.kwargs[0])
    own = run_block(blocks[1], entering, captured.kwargs[1])
    replayed = run_block(blocks[1], entering, captured.kwargs[0])
    assert (own - replayed).abs().max() > 1e-2


def _zero_fraction_ok(weight: torch.Tensor, target: str) -> bool:
    """Every matrix (every expert's slice of a fused weight) at the target."""
    slices = weight.reshape(-1, *weight.shape[-2:]) if weight.ndim == 3 else weight.unsqueeze(0)
    for matrix in slices:
        zeros = matrix == 0
        if ":" in target:
            n, m = map(int, target.split(":"))  # n zeros in every m consecutive inputs of a row
            if not torch.all(zeros.reshape(matrix.shape[0], -1, m).sum(-1) == n):
                return False
        elif abs(float(zeros.float().mean()) - float(target)) > 1 / matrix.shape[1]:
            return False
    return True


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_every_method_prunes_every_family_and_the_saved_folder_gives_the_same_logits(family, tmp_path):
    dense = tiny_model(family)
    names = prunable_weight_names(dense)
    ids = tokens()
    for method in ("magnitude", "wanda", "sparsegpt", "apt"):
        for target in ("0.5", "2:4"):
            model = copy.deepcopy(dense)
            fields = {"pattern": target} if ":" in target else {"sparsity": float(target)}
            summary = prune_model(model, ids, Recipe(method=method, block_size=16, **fields), progress=False)
            assert len(summary.errors) == len(names), (method, sorted(summary.errors))
            for name in names:
                assert _zero_fraction_ok(model.get_parameter(name), target), (family, method, target, name)
            assert all(0 <= e < 1 for e in summary.errors.values()), summary.errors
    # The saved folder (of the last, APT 2:4) reloads with from_pretrained and gives the same logits.
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected, got = model(input_ids=ids[:1]).logits, reloaded(input_ids=ids[:1]).logits
    assert torch.allclose(expected, got, atol=1e-5), family


@pytest.mark.parametrize("family", sorted(MOE))
def test_experts_are_pruned_on_their_routed_tokens_and_counted(family, monkeypatch):
    model = tiny_model(family)
    ids = tokens(8)
    summary = prune_model(model, ids, Recipe(method="sparsegpt", sparsity=0.5), progress=False)
    blocks = adapter_for(model).blocks(model)
    top_k = model.config.num_experts_per_tok
    for index, block in enumerate(blocks):
        for name in block_experts(block):
            usage = summary.experts[f"model.layers.{index}.{name}.gate_up_proj"]
            # every token goes to top_k experts: the counts add up to the calibration tokens times top_k
            assert sum(usage.tokens) == ids.numel() * top_k and usage.fallback == []
            assert summary.experts[f"model.layers.{index}.{name}.down_proj"].tokens == usage.tokens

    # An expert that gets too few tokens is pruned by magnitude instead, and says so.
    import pruning_core.experts as experts

    monkeypatch.setattr(experts, "MIN_EXPERT_TOKENS", 10**6)
    starved = prune_model(tiny_model(family), ids, Recipe(method="sparsegpt", sparsity=0.5), progress=False)
    usage = starved.experts["model.layers.0.mlp.experts.gate_up_proj"]
    assert usage.fallback == list(range(len(usage.tokens)))


@pytest.mark.parametrize("family", sorted(MOE))
def test_owl_allocates_over_experts_too(family):
    from pruning_core.owl import outlier_fractions

    fractions = outlier_fractions(tiny_model(family), tokens(4), progress=False)
    assert len(fractions) == 2 and all(0 <= f < 1 for f in fractions)
