"""Mixture-of-experts checkpoints as published: one tensor per expert on disk, fused by transformers in memory.

A pruned folder keeps its source's layout (per expert, or fused where the source was saved fused), its sparsity
report measures the saved tensors (each expert's own), and it reloads to the logits of the pruned model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from flows.cli import main
from pruning_core.job import prune_to_folder
from pruning_core.modeling import load_model, saved_weight_names
from pruning_core.recipe import Recipe
from tests.conftest import FAMILY_CONFIGS, WIKITEXT_VALID, tiny_model

_ATTENTION = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2}
CONFIGS = {
    "mixtral": FAMILY_CONFIGS["mixtral"],
    "qwen3_moe": FAMILY_CONFIGS["qwen3_moe"],
    # Shared expert (and its gate, a router) beside the routed ones; block 1 a dense MLP, as mlp_only_layers allows.
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            **_ATTENTION,
            "intermediate_size": 128,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "mlp_only_layers": [1],
        },
    ),
    "olmoe": ("OlmoeConfig", {**_ATTENTION, "intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2}),
}
# How each family's hub checkpoints name expert e's matrices: (module of the MoE block, gate, up, down).
HUB_EXPERTS = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "olmoe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}
SEQ_LEN = 32


def tokens(samples: int) -> torch.Tensor:
    return torch.randint(0, 256, (samples, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    (file,) = folder.glob("*.safetensors")
    return load_file(file)


def hub_layout(fused: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A fused state dict rewritten with the hub's keys: `experts.{e}.{gate,up,down}` matrices per expert."""
    module, gate, up, down = HUB_EXPERTS[family]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in fused.items():
        key = key.replace(".mlp.", f".{module}.")  # Mixtral's whole sparse block is `block_sparse_moe` on disk
        stem, _, leaf = key.rpartition(".")
        if leaf == "gate_up_proj":  # experts x (gate rows, then up rows) x hidden
            for expert, matrix in enumerate(tensor):
                out[f"{stem}.{expert}.{gate}.weight"], out[f"{stem}.{expert}.{up}.weight"] = matrix.chunk(2)
        elif leaf == "down_proj" and tensor.ndim == 3:
            out.update({f"{stem}.{expert}.{down}.weight": matrix for expert, matrix in enumerate(tensor)})
        else:
            out[key] = tensor
    return {key: tensor.contiguous() for key, tensor in out.items()}


def source_folder(family: str, layout: str, root: Path, tokenizer) -> tuple[Path, torch.Tensor]:
    """A tiny random model of `family` saved fused, or rewritten as its published checkpoints are; its logits."""
    config_class, fields = CONFIGS[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(getattr(transformers, config_class)(vocab_size=256, **fields)).eval()
    folder = root / f"{family}-{layout}"
    model.save_pretrained(folder, save_original_format=False)  # transformers' in-memory (fused) names
    tokenizer.save_pretrained(folder)
    if layout == "per_expert":
        (file,) = folder.glob("*.safetensors")
        save_file(hub_layout(load_file(file), family), file, metadata={"format": "pt"})
    with torch.no_grad():
        return folder, model(input_ids=tokens(1)).logits


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_pruned_moe_keeps_its_sources_layout_and_reloads_to_the_same_logits(family, layout, tmp_path, tiny_tokenizer):
    source, dense_logits = source_folder(family, layout, tmp_path, tiny_tokenizer)
    source_keys = set(saved_tensors(source))
    assert any(".experts.0." in key for key in source_keys) == (layout == "per_expert")
    model, tokenizer = load_model(str(source))
    with torch.no_grad():  # the fixture is a checkpoint transformers reads as it reads the published ones
        assert torch.equal(model(input_ids=tokens(1)).logits, dense_logits)

    out = tmp_path / "pruned"
    report = prune_to_folder(model, tokenizer, tokens(8), Recipe(method="wanda", sparsity=0.5), out, progress=False)

    saved = saved_tensors(out)
    assert set(saved) == source_keys, "the pruned folder keeps its source's tensors, named as there"
    experts = {key for key in saved if ".experts." in key}
    expected_experts = 2 * 3 * 4 if layout == "per_expert" else 2 * 2  # blocks x matrices x experts, or fused
    if family == "qwen2_moe":
        expected_experts //= 2  # block 1 is a dense MLP
    assert len(experts) == expected_experts and experts <= set(report.layers)
    for key in experts:  # every expert's matrix at the target, as the report says
        matrices = saved[key].reshape(-1, *saved[key].shape[-2:])
        assert all(float((m == 0).float().mean()) == 0.5 for m in matrices), key
        assert report.layers[key] == 0.5
    assert not any(key.endswith((".gate.weight", "shared_expert_gate.weight")) for key in report.layers), "routers"
    assert set(report.layers) == set(saved_weight_names(model)) and report.total == 0.5
    assert report.parameters == sum(saved[key].numel() for key in report.layers)

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=tokens(1)).logits, model(input_ids=tokens(1)).logits)


def test_a_model_built_from_its_config_saves_as_its_family_publishes(tmp_path, tiny_tokenizer):
    """No source folder (benchmarks, notebooks): saved in the family's default (hub) layout, and checked there."""
    model = tiny_model("mixtral")
    out = tmp_path / "pruned"
    report = prune_to_folder(model, tiny_tokenizer, tokens(8), Recipe(method="magnitude", sparsity=0.5), out)
    assert report.layers["model.layers.0.block_sparse_moe.experts.2.w2.weight"] == 0.5
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=tokens(1)).logits, model(input_ids=tokens(1)).logits)


def test_secateur_prune_on_a_published_layout_mixtral(capsys, tmp_path, monkeypatch, tiny_tokenizer):
    """The issue's failure: `secateur prune` on per-expert Mixtral stopped at the save check."""
    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "home"))
    source, _ = source_folder("mixtral", "per_expert", tmp_path, tiny_tokenizer)
    out = tmp_path / "pruned"
    argv = ["prune", source, "--method", "sparsegpt", "--sparsity", 0.5, "--calibration", WIKITEXT_VALID]
    code = main([str(a) for a in [*argv, "--samples", 4, "--seq-len", SEQ_LEN, "--out", out, "--json"]])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "sparsity.json").read_text())
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == set(saved_tensors(source))
    w1, w3 = (f"model.layers.1.block_sparse_moe.experts.3.{m}.weight" for m in ("w1", "w3"))
    # SparseGPT holds 50% over an expert's fused gate/up matrix: each half is measured on its own, near 50%
    assert abs(report["layers"][w1] - 0.5) < 0.05 and report["layers"][w1] + report["layers"][w3] == 1.0
    assert report["total"] == 0.5
