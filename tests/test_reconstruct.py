"""Block reconstruction after the layer-wise prune: lower block error, masks kept exactly, bit-identical resume."""

from __future__ import annotations

import copy

import pytest
import torch

from pruning_core.adapters import adapter_for
from pruning_core.blocks import block_linears, capture_block_inputs
from pruning_core.engine import block_outputs, prune_model
from pruning_core.recipe import Recipe
from pruning_core.reconstruct import BlockReconstruction, block_error, reconstruct_block
from tests.conftest import tiny_model

REFIT = {"epochs": 4, "batch_size": 2, "learning_rate": 1e-3}


def _calibration(trained_tiny, samples: int = 8) -> torch.Tensor:
    return trained_tiny[1][: samples * 64].reshape(samples, 64)


def _trained(trained_tiny):
    model = tiny_model("llama")
    model.load_state_dict(trained_tiny[0].state_dict())
    return model.eval()


def _zeros(model) -> dict[str, torch.Tensor]:
    return {
        f"{index}.{name}": linear.weight == 0
        for index, block in enumerate(adapter_for(model).blocks(model))
        for name, linear in block_linears(block).items()
    }


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "apt"])
@pytest.mark.parametrize("target", [{"sparsity": 0.6}, {"pattern": "2:4"}])
def test_every_block_ends_closer_to_its_dense_outputs_with_the_same_sparsity(trained_tiny, method, target):
    ids = _calibration(trained_tiny)
    plain, refit = _trained(trained_tiny), _trained(trained_tiny)
    prune_model(plain, ids, Recipe(method=method, block_size=32, **target), progress=False)
    recipe = Recipe(method=method, block_size=32, block_reconstruction=REFIT, **target)
    summary = prune_model(refit, ids, recipe, progress=False)
    assert sorted(summary.reconstruction) == list(range(len(adapter_for(refit).blocks(refit))))
    for index, result in summary.reconstruction.items():
        assert result.kept and result.error_after < result.error_before, (index, result)
        assert result.steps == REFIT["epochs"] * 4  # 8 samples in steps of 2
    assert sum(r.error_after for r in summary.reconstruction.values()) < 0.9 * sum(
        r.error_before for r in summary.reconstruction.values()
    )
    # Every removed weight is still exactly zero: the same count (and N:M pattern) as the layer-wise prune.
    for name, zeros in _zeros(refit).items():
        assert int(zeros.sum()) == int(_zeros(plain)[name].sum()), name
        if "pattern" in target:  # 2 of every 4 consecutive weights of a row
            assert bool((zeros.reshape(zeros.shape[0], -1, 4).sum(dim=-1) >= 2).all()), name
    assert summary.phase_seconds["reconstruct"] > 0


def test_a_block_refit_keeps_each_mask_and_is_undone_when_it_cannot_help(trained_tiny):
    model = _trained(trained_tiny)
    blocks = adapter_for(model).blocks(model)
    captured = capture_block_inputs(model, blocks, _calibration(trained_tiny))
    block, kwargs = blocks[0], captured.kwargs[0]
    inputs = captured.hidden
    targets = block_outputs(block, inputs, kwargs, "", False, 8)
    for linear in block_linears(block).values():  # every other weight removed, by position
        linear.weight.data[:, ::2] = 0
    zeros = {name: linear.weight == 0 for name, linear in block_linears(block).items()}
    pruned = copy.deepcopy(block.state_dict())
    before = block_error(block, inputs, targets, kwargs, 8)
    result = reconstruct_block(block, inputs, targets, kwargs, BlockReconstruction(**REFIT), seed=0, forward_batch=8)
    assert result.kept and result.error_after < result.error_before == pytest.approx(before, rel=1e-6)
    assert block_error(block, inputs, targets, kwargs, 8) == pytest.approx(result.error_after, rel=1e-6)
    for name, linear in block_linears(block).items():
        assert torch.equal(linear.weight == 0, zeros[name]), name
    # A learning rate that only makes things worse: the layer-wise weights come back exactly.
    block.load_state_dict(pruned)
    harmful = BlockReconstruction(epochs=1, batch_size=8, learning_rate=1.0)
    result = reconstruct_block(block, inputs, targets, kwargs, harmful, seed=0, forward_batch=8)
    assert not result.kept and result.error_after == result.error_before
    for name, tensor in block.state_dict().items():
        assert torch.equal(tensor, pruned[name]), name


def test_resume_at_block_k_with_block_reconstruction_is_bit_identical(trained_tiny):
    ids = _calibration(trained_tiny)
    recipe = Recipe(method="sparsegpt", sparsity=0.5, block_size=32, block_reconstruction=REFIT)
    full = _trained(trained_tiny)
    saved: dict[int, object] = {}
    prune_model(full, ids, recipe, progress=False, on_block=lambda r: saved.__setitem__(r.index, r))
    assert all(saved[i].reconstruction is not None for i in saved)
    k = 1
    resumed = _trained(trained_tiny)
    blocks = adapter_for(resumed).blocks(resumed)
    for index in range(k):
        blocks[index].load_state_dict(saved[index].state_dict)
    summary = prune_model(resumed, ids, recipe, start_block=k, start_inputs=saved[k - 1].next_inputs, progress=False)
    assert sorted(summary.reconstruction) == list(range(k, len(blocks)))
    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_block_reconstruction_belongs_to_unstructured_recipes_and_keeps_old_fingerprints():
    plain = Recipe(method="apt", sparsity=0.5)
    assert "block_reconstruction" not in plain.canonical_json()
    refit = Recipe(method="apt", sparsity=0.5, block_reconstruction={})
    assert refit.fingerprint() != plain.fingerprint()
    assert refit.block_reconstruction == BlockReconstruction()
    with pytest.raises(ValueError, match="unstructured"):
        Recipe(method="llm_pruner", ratio=0.2, block_reconstruction={})
