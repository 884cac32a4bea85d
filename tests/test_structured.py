"""LLM-Pruner: dependency groups, importance, physically smaller models that load again."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruning_core.adapters import LLAMA_PROJECTIONS
from pruning_core.modeling import load_model
from pruning_core.structured.groups import block_shape, head_rows, keep_attention, keep_channels
from pruning_core.structured.importance import aggregate, gradient_statistics, projection_weights
from pruning_core.structured.llm_pruner import (
    StructuredPruningError,
    StructuredSettings,
    parameter_count,
    prune_structured,
)
from pruning_core.structured.storage import SHAPES_KEY, has_block_shapes, save_structured
from tests.conftest import tiny_model

# LLM-Pruner's own setting: blocks kept whole at the ends, the ratio counting all parameters.
PER_BLOCK = {"ratio_of": "all", "widths": "per_block"}

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_removing_a_head_removes_its_rows_and_columns_and_equals_zeroing(family):
    model = tiny_model(family)
    reference = tiny_model(family)
    attn = model.model.layers[0].self_attn
    dim = attn.head_dim
    q, k, v, o = (
        attn.q_proj.weight.clone(),
        attn.k_proj.weight.clone(),
        attn.v_proj.weight.clone(),
        attn.o_proj.weight.clone(),
    )
    # 4 q heads over 2 kv heads: drop q head 1 (kv 0) and q head 2 (kv 1), every kv head keeps one q head.
    keep_attention(model.model.layers[0], keep_q=[0, 3], keep_kv=[0, 1])
    assert torch.equal(attn_q := model.model.layers[0].self_attn.q_proj.weight, q[head_rows([0, 3], dim)])
    assert attn_q.shape == (2 * dim, 64)
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, k)
    assert torch.equal(model.model.layers[0].self_attn.v_proj.weight, v)
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, o[:, head_rows([0, 3], dim)])
    # Dense model with those heads' o_proj columns zeroed computes the same function.
    with torch.no_grad():
        reference.model.layers[0].self_attn.o_proj.weight[:, head_rows([1, 2], dim)] = 0
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-5, rtol=0)


def test_removing_kv_groups_and_channels_equals_zeroing():
    model, reference = tiny_model("llama"), tiny_model("llama")
    block, dense = model.model.layers[1], reference.model.layers[1]
    dim = block.self_attn.head_dim
    keep_attention(block, keep_q=[2, 3], keep_kv=[1])  # kv group 0 (q heads 0, 1) goes
    keep_channels(block, [c for c in range(128) if c % 3])
    assert block_shape(block).as_dict() == {"heads": 2, "kv_heads": 1, "intermediate_size": 85}
    assert block.mlp.down_proj.weight.shape == (64, 85)
    with torch.no_grad():
        dense.self_attn.o_proj.weight[:, head_rows([0, 1], dim)] = 0
        dense.mlp.down_proj.weight[:, [c for c in range(128) if c % 3 == 0]] = 0
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-5, rtol=0)


def test_aggregations():
    scores = [torch.tensor([1.0, 4.0]), torch.tensor([3.0, 2.0])]
    assert aggregate(scores, "sum").tolist() == [4.0, 6.0]
    assert aggregate(scores, "mean").tolist() == [2.0, 3.0]
    assert aggregate(scores, "max").tolist() == [3.0, 4.0]
    assert aggregate(scores, "prod").tolist() == [3.0, 8.0]


def test_fisher_statistics_are_sums_of_squared_per_sample_gradients():
    model = tiny_model("llama")
    weights = projection_weights(model, "model.layers", [1], LLAMA_PROJECTIONS)
    first = gradient_statistics(model, weights, IDS, "element1", progress=False)
    second = gradient_statistics(model, weights, IDS, "element2", progress=False)
    name = "model.layers.1.mlp.down_proj.weight"
    assert all(p.grad is None for p in model.parameters())  # nothing left behind
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    per_sample = []
    for row in IDS:
        model.zero_grad()
        model(input_ids=row[None], labels=row[None]).loss.backward()
        per_sample.append(model.get_submodule("model.layers.1.mlp.down_proj").weight.grad.clone())
    torch.testing.assert_close(first[name], per_sample[0] + per_sample[1])
    torch.testing.assert_close(second[name], per_sample[0] ** 2 + per_sample[1] ** 2)


@pytest.mark.parametrize("importance", ["element1", "element2", "vector"])
def test_prune_structured_removes_the_ratio_and_drops_the_least_important(importance):
    model = tiny_model("llama")
    settings = StructuredSettings(ratio=0.1, **PER_BLOCK, importance=importance, keep_first=1, keep_last=1)
    result = prune_structured(model, IDS, settings, progress=False)
    assert [plan.index for plan in result.plans] == [1]
    assert result.parameters_after == parameter_count(model) < result.parameters_before
    assert result.removed == pytest.approx(0.1, abs=0.01)
    assert block_shape(model.model.layers[0]).intermediate_size == 128  # kept whole
    assert block_shape(model.model.layers[2]).intermediate_size == 128
    assert _logits(model).isfinite().all()


def test_importance_picks_channels_with_small_contribution():
    model = tiny_model("llama")
    with torch.no_grad():  # channels 0..9 of block 1 barely matter: tiny down_proj columns
        model.model.layers[1].mlp.down_proj.weight[:, :10] *= 1e-4
    settings = StructuredSettings(ratio=0.02, **PER_BLOCK, keep_first=1, keep_last=1)
    result = prune_structured(model, IDS, settings, progress=False)
    kept = set(result.plans[0].keep_channels)
    assert 128 - len(kept) >= 10 and not kept & set(range(10))


def test_without_gqa_a_head_goes_with_its_k_and_v(tiny_tokenizer, tmp_path):
    from tests.conftest import save_tiny

    folder = save_tiny(tmp_path / "mha", tiny_tokenizer, num_key_value_heads=4)
    model, _ = load_model(str(folder))
    settings = StructuredSettings(ratio=0.1, **PER_BLOCK, keep_first=1, keep_last=1, attention_unit="q_heads")
    result = prune_structured(model, IDS, settings, progress=False)
    after = result.plans[0].after
    assert after.heads == after.kv_heads < 4  # whole heads, not q heads alone
    assert _logits(model).isfinite().all()


@pytest.mark.parametrize("family", ["phi3", "olmo2", "mixtral", "opt"])
def test_a_family_llm_pruner_cannot_cut_is_refused_in_one_line(family):
    with pytest.raises(StructuredPruningError, match=f"llm_pruner supports the .* families, not '{family}'$"):
        prune_structured(tiny_model(family), IDS, StructuredSettings(ratio=0.1, **PER_BLOCK, keep_first=0, keep_last=0))


def test_a_ratio_the_pruned_blocks_cannot_give_is_refused():
    with pytest.raises(StructuredPruningError, match="lower the ratio"):
        prune_structured(
            tiny_model("llama"), IDS, StructuredSettings(ratio=0.5, **PER_BLOCK, keep_first=1, keep_last=1)
        )
    with pytest.raises(StructuredPruningError, match="nothing to prune"):
        prune_structured(tiny_model("llama"), IDS, StructuredSettings(ratio=0.1, **PER_BLOCK))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"])
def test_uniform_widths_load_with_plain_from_pretrained(tmp_path, tiny_tokenizer, family):
    model = tiny_model(family)
    settings = StructuredSettings(ratio=0.3, **PER_BLOCK, keep_first=0, keep_last=0, attention_unit="kv_groups")
    prune_structured(model, IDS, settings, progress=False)
    assert save_structured(model, tiny_tokenizer, tmp_path) is True
    assert not has_block_shapes(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_key_value_heads == 1 and loaded.config.num_attention_heads == 2
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_heterogeneous_widths_round_trip_through_our_loader(tmp_path, tiny_tokenizer, family):
    model = tiny_model(family)
    prune_structured(model, IDS, StructuredSettings(ratio=0.15, **PER_BLOCK, keep_first=1, keep_last=0), progress=False)
    assert save_structured(model, tiny_tokenizer, tmp_path) is False
    assert has_block_shapes(tmp_path)
    with pytest.raises(ValueError, match="secateur_structured"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path))
    shapes = [block_shape(b).as_dict() for b in loaded.model.layers]
    assert shapes == [block_shape(b).as_dict() for b in model.model.layers]
    assert shapes[0] != shapes[1]
    assert loaded.config.to_dict()[SHAPES_KEY] == shapes
    assert parameter_count(loaded) == parameter_count(model)
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=0)
    generated = loaded.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False)  # cache path works too
    assert generated.shape == (1, 9)


def test_activation_importance_drops_the_channels_that_never_fire():
    model = tiny_model("llama")
    with torch.no_grad():  # channels 0..7 of every block's MLP output exactly zero: gate rows of zeros
        for block in model.model.layers:
            block.mlp.gate_proj.weight[:8] = 0
    result = prune_structured(model, IDS, StructuredSettings(ratio=0.05, refit="none"), progress=False)
    assert StructuredSettings(ratio=0.05).scores == "activation"
    for plan in result.plans:
        assert len(plan.keep_channels) == 120 and not set(plan.keep_channels) & set(range(8))


@pytest.mark.parametrize("unit", ["none", "q_heads"])
def test_the_refit_lowers_each_cut_layers_output_error_on_the_calibration(unit):
    from pruning_core.structured.refit import InputGrams

    dense = tiny_model("llama")
    ids = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(2))
    pruned = {}
    for refit in ("none", "least_squares"):
        model = tiny_model("llama")
        settings = StructuredSettings(ratio=0.3, attention_unit=unit, refit=refit)
        pruned[refit] = prune_structured(model, ids, settings, progress=False), model
    (plain_result, plain), (refit_result, refitted) = pruned["none"], pruned["least_squares"]
    assert [p.keep_channels for p in plain_result.plans] == [p.keep_channels for p in refit_result.plans]
    assert plain_result.parameters_after == refit_result.parameters_after
    # the dense model's own down_proj inputs, sliced to the kept channels, are what the refit was fitted on
    layer = 1
    inputs = {}
    grams = InputGrams({"down": dense.model.layers[layer].mlp.down_proj})
    handle = dense.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: inputs.setdefault("x", []).append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for row in ids:
            dense(input_ids=row.unsqueeze(0), use_cache=False)
    handle.remove()
    grams.remove()
    x = torch.cat(inputs["x"])
    keep = torch.tensor(plain_result.plans[layer].keep_channels)
    target = x @ dense.model.layers[layer].mlp.down_proj.weight.T

    def error(model):
        return (x[:, keep] @ model.model.layers[layer].mlp.down_proj.weight.T - target).square().sum().item()

    assert error(refitted) < 0.9 * error(plain)
    if unit == "q_heads":  # o_proj reads the cut heads: refitted too
        assert not torch.equal(
            plain.model.layers[layer].self_attn.o_proj.weight, refitted.model.layers[layer].self_attn.o_proj.weight
        )
    assert _logits(refitted).isfinite().all()


def test_a_huge_refit_damping_gives_the_plain_slice():
    from pruning_core.structured.refit import refit_kept_columns

    weight = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    x = torch.randn(50, 10, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([0, 2, 3, 7])
    sliced = refit_kept_columns(weight, x.T @ x, keep, damp=1e9)
    torch.testing.assert_close(sliced, weight[:, keep], atol=1e-5, rtol=0)
    # undamped it is the least-squares solution
    exact = refit_kept_columns(weight, x.T @ x, keep, damp=1e-12)
    expected = torch.linalg.lstsq(x[:, keep].double(), (x @ weight.T).double()).solution.T.float()
    torch.testing.assert_close(exact, expected, atol=1e-4, rtol=0)
