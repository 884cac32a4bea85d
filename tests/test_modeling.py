"""Model specs, saving in Hugging Face format and the sparsity report."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruning_core.modeling import ModelSource, ModelSpecError, prunable_weight_names, save_model, sparsity_report
from tests.conftest import tiny_model


def test_model_specs(tmp_path):
    hub = ModelSource.parse("hf://HuggingFaceTB/SmolLM2-135M@abc123")
    assert (hub.location, hub.revision, hub.gguf_file) == ("HuggingFaceTB/SmolLM2-135M", "abc123", None)
    assert ModelSource.parse("hf://org/name").revision is None
    assert hub.kwargs(trust_remote_code=False) == {"trust_remote_code": False, "revision": "abc123"}
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    local = ModelSource.parse(str(gguf))
    assert (local.location, local.gguf_file) == (str(tmp_path), "m.gguf")
    with pytest.raises(ModelSpecError, match="hf://org/name"):
        ModelSource.parse("hf://just-a-name")
    with pytest.raises(ModelSpecError, match="model not found"):
        ModelSource.parse(str(tmp_path / "absent"))
    with pytest.raises(ModelSpecError, match=r"no config\.json"):
        ModelSource.parse(str(tmp_path))


def test_saved_model_loads_and_report_counts_saved_zeros(tmp_path, tiny_tokenizer):
    model = tiny_model("llama")
    names = prunable_weight_names(model)
    assert len(names) == 3 * 7 and names[0] == "model.layers.0.self_attn.q_proj.weight"
    target = model.get_parameter(names[0])
    with torch.no_grad():
        target[:, ::2] = 0  # exactly half of one 64 x 64 matrix
    save_model(model, tiny_tokenizer, tmp_path / "out")
    report = sparsity_report(tmp_path / "out", names)
    assert report["layers"][names[0]] == 0.5
    assert report["zeros"] == 64 * 32
    assert report["total"] == pytest.approx(64 * 32 / report["parameters"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(reloaded.get_parameter(names[0]), target)
    with pytest.raises(ModelSpecError, match="lack 1 prunable tensors"):
        sparsity_report(tmp_path / "out", [*names, "model.layers.9.mlp.up_proj.weight"])
