"""Block-sequential engine on tiny models of every supported family."""

from __future__ import annotations

import copy

import pytest
import torch

from pruning_core.adapters import UnsupportedArchitecture, adapter_for
from pruning_core.engine import prune_model
from pruning_core.modeling import prunable_weight_names
from pruning_core.recipe import Recipe
from tests.conftest import tiny_model


def calibration(samples: int = 4, seq_len: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (samples, seq_len), generator=torch.Generator().manual_seed(0))


def test_mamba_dt_proj_gets_statistics_from_x_proj_output():
    model = tiny_model("mamba")
    names = adapter_for(model).linear_names(model.backbone.layers[0])
    assert "mixer.dt_proj" in names
    summary = prune_model(model, calibration(), Recipe(method="sparsegpt", sparsity=0.5, block_size=8), progress=False)
    assert summary.errors["backbone.layers.0.mixer.dt_proj"] > 0
    assert float((model.backbone.layers[0].mixer.dt_proj.weight == 0).float().mean()) == 0.5


def test_an_architecture_without_linear_layers_is_refused_in_one_line():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitecture, match=r"'gpt2': its blocks \(transformer\.h\) hold no torch"):
        prune_model(model, calibration(), Recipe(method="wanda", sparsity=0.5), progress=False)


def test_skip_list_and_per_layer_overrides():
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    recipe = Recipe(
        method="sparsegpt",
        sparsity=0.5,
        skip=["model.layers.0.self_attn.*", "*.down_proj"],
        layer_sparsity={"model.layers.2.mlp.up_proj": 0.75},
    )
    summary = prune_model(model, calibration(), recipe, progress=False)
    for name in prunable_weight_names(model):
        weight = model.get_parameter(name)
        if name.startswith("model.layers.0.self_attn.") or "down_proj" in name:
            assert torch.equal(weight, dense.get_parameter(name)), f"{name} was skipped and must be untouched"
            assert name.removesuffix(".weight") not in summary.errors
        elif name == "model.layers.2.mlp.up_proj.weight":
            assert float((weight == 0).float().mean()) == 0.75
        else:
            assert float((weight == 0).float().mean()) == 0.5


def test_true_sequential_prunes_with_inputs_of_already_pruned_layers():
    base = tiny_model("llama")
    plain, sequential = copy.deepcopy(base), copy.deepcopy(base)
    prune_model(plain, calibration(), Recipe(method="sparsegpt", sparsity=0.5), progress=False)
    prune_model(
        sequential, calibration(), Recipe(method="sparsegpt", sparsity=0.5, true_sequential=True), progress=False
    )
    q_plain = plain.model.layers[0].self_attn.q_proj.weight
    q_seq = sequential.model.layers[0].self_attn.q_proj.weight
    o_plain = plain.model.layers[0].self_attn.o_proj.weight
    o_seq = sequential.model.layers[0].self_attn.o_proj.weight
    assert torch.equal(q_plain, q_seq), "the first group sees the same inputs either way"
    assert not torch.equal(o_plain, o_seq), "o_proj sees the outputs of the pruned q/k/v in true-sequential mode"


# CUDA runs where a GPU is (the lent device machine): deterministic kernels keep a resume bit-identical there too.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


RESUMED = {
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "apt": {"method": "apt"},  # with its default ADMM mask refinement
    "apt-2:4-refined": {"method": "apt", "pattern": "2:4", "sparsity": None},
    "apt-ridge": {"method": "apt", "refit_ridge": "heldout", "mask_refinement": None},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(RESUMED))
def test_resume_at_block_k_is_bit_identical(method, device):
    recipe = Recipe(**{"sparsity": 0.5, "block_size": 32, **RESUMED[method]})
    full = tiny_model("llama")
    saved: dict[int, object] = {}
    prune_model(
        full, calibration(), recipe, device=device, progress=False, on_block=lambda r: saved.__setitem__(r.index, r)
    )

    k = 2
    resumed = tiny_model("llama")  # fresh dense model, as after a crash
    blocks = adapter_for(resumed).blocks(resumed)
    for index in range(k):
        blocks[index].load_state_dict(saved[index].state_dict)
    seen = []
    summary = prune_model(
        resumed,
        calibration(),
        recipe,
        start_block=k,
        start_inputs=saved[k - 1].next_inputs,
        device=device,
        progress=False,
        on_block=lambda r: seen.append(r.index),
    )
    assert seen == [2] and summary.start_block == 2
    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_block_callback_reports_state_inputs_and_errors():
    results = []
    model = tiny_model("llama")
    prune_model(
        model, calibration(3, 16), Recipe(method="wanda", sparsity=0.5), progress=False, on_block=results.append
    )
    assert [r.index for r in results] == [0, 1, 2]
    assert results[0].next_inputs.shape == (3, 16, 64)
    assert set(results[1].errors) == {
        f"model.layers.1.{n}" for n in adapter_for(model).linear_names(model.model.layers[1])
    }
    assert "self_attn.q_proj.weight" in results[1].state_dict


def test_resume_needs_saved_inputs():
    with pytest.raises(ValueError, match="saved inputs"):
        prune_model(tiny_model("llama"), calibration(), Recipe(method="wanda", sparsity=0.5), start_block=1)


@pytest.mark.parametrize("family", ["llama", "opt", "mamba"])
def test_batched_block_forward_matches_one_sample_at_a_time(family):
    from pruning_core.blocks import capture_block_inputs
    from pruning_core.engine import block_outputs, observe_groups

    model = tiny_model(family)
    adapter = adapter_for(model)
    block = adapter.blocks(model)[0]
    captured = capture_block_inputs(model, adapter.blocks(model), calibration(6, 24))
    inputs, kwargs = captured.hidden, captured.kwargs[0]
    one = block_outputs(block, inputs, kwargs, "", False, batch=1)
    batched = block_outputs(block, inputs, kwargs, "", False, batch=4)  # uneven: 4 + 2
    assert torch.allclose(one, batched, atol=1e-5, rtol=1e-5)
    groups = adapter.groups(block, inputs, kwargs)
    stats = {}
    for batch in (1, 4):
        observers = observe_groups(adapter, block, groups, inputs, kwargs, device="cpu", batch=batch)
        stats[batch] = [(o.stats.tokens, o.stats.hessian(), o.sample) for o in observers]
    for (tokens_1, hessian_1, sample_1), (tokens_4, hessian_4, sample_4) in zip(stats[1], stats[4], strict=True):
        assert tokens_1 == tokens_4 == 6 * 24
        assert torch.allclose(hessian_1, hessian_4, atol=1e-5, rtol=1e-4)
        assert torch.allclose(sample_1, sample_4, atol=1e-5) and sample_1.shape[0] == 24, "probe is the first sample"
    # One pass for statistics and outputs (a block not pruned in between, as OWL's): the same of both.
    outputs = torch.empty_like(inputs)
    observers = observe_groups(adapter, block, groups, inputs, kwargs, device="cpu", batch=4, outputs=outputs)
    assert torch.equal(outputs, batched)
    for observer, (_, hessian_4, _) in zip(observers, stats[4], strict=True):
        assert torch.equal(observer.stats.hessian(), hessian_4)


def test_statistics_pass_stops_once_its_inputs_are_seen():
    from pruning_core.blocks import capture_block_inputs
    from pruning_core.engine import observe_groups

    model = tiny_model("llama")
    adapter = adapter_for(model)
    block = adapter.blocks(model)[0]
    captured = capture_block_inputs(model, adapter.blocks(model), calibration(4, 16))
    inputs, kwargs = captured.hidden, captured.kwargs[0]
    first_stage = adapter.groups(block, inputs, kwargs)[:1]  # q/k/v: only the input norm runs before them
    calls = []
    handle = block.mlp.down_proj.register_forward_hook(lambda *args: calls.append(1))
    observers = observe_groups(adapter, block, first_stage, inputs, kwargs, device="cpu", batch=2)
    handle.remove()
    assert calls == [], "nothing after q/k/v's input runs in the first true-sequential stage"
    assert observers[0].stats.tokens == 4 * 16


def test_forward_batches_stay_within_the_memory_budget():
    from pruning_core.engine import samples_per_forward

    block = tiny_model("llama").model.layers[0]  # widest linear: 128
    inputs = torch.zeros(64, 256, 64)
    per_sample = 256 * 128 * 4 * 8
    assert samples_per_forward(block, inputs, budget_mib=4) == 4 * 2**20 // per_sample == 4
    assert samples_per_forward(block, inputs, budget_mib=1024) == 64, "never more than the samples there are"
    assert samples_per_forward(block, torch.zeros(3, 100_000, 64), budget_mib=16) == 1, "at least one sample"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["sparsegpt", "apt"])
def test_bf16_model_in_bf16_model_out(method, device, tmp_path, tiny_tokenizer):
    from safetensors import safe_open

    from pruning_core.job import prune_to_folder

    model = tiny_model("llama").to(torch.bfloat16)
    report = prune_to_folder(
        model,
        tiny_tokenizer,
        calibration(),
        Recipe(method=method, pattern="2:4", block_size=32),
        tmp_path,
        device=device,
        progress=False,
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        dtypes = {handle.get_tensor(name).dtype for name in handle.keys()}
    assert dtypes == {torch.bfloat16}
    assert report.total == 0.5
    assert torch.isfinite(model(input_ids=calibration(1)).logits).all()
