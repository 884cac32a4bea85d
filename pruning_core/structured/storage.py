"""Saving and loading structurally pruned models.

When every block has the same widths the config's `num_attention_heads`, `num_key_value_heads`,
`intermediate_size` (and an explicit `head_dim`) describe the model and plain `from_pretrained` loads
it. When widths differ per block the config keeps the original widths plus `secateur_block_shapes`
(one entry per block) and `load_structured` builds the model, narrows each block, then loads the
safetensors weights (no custom code, no pickles). Such a config names its own `model_type` (the
architecture's is kept in `secateur_model_type`): plain `from_pretrained` would otherwise load it
with a warning and random weights in every narrowed layer; this way it refuses.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pruning_core.adapters import adapter_for
from pruning_core.structured.groups import BlockShape, block_shape, head_dim, reshape_block

SHAPES_KEY = "secateur_block_shapes"
TYPE_KEY = "secateur_model_type"
STRUCTURED_TYPE = "secateur_structured"


def block_shapes(model: nn.Module) -> list[BlockShape]:
    return [block_shape(block) for block in adapter_for(model).blocks(model)]


def save_structured(model: nn.Module, tokenizer, out_dir: str | Path) -> bool:
    """Save in Hugging Face format; returns True when plain `from_pretrained` can load the result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = block_shapes(model)
    original = model.config
    config = copy.deepcopy(original)  # the live config is shared by the model's modules: leave it alone
    config.head_dim = head_dim(adapter_for(model).blocks(model)[0])
    # transformers validates hidden_size % num_attention_heads == 0 even with an explicit head_dim.
    uniform = len(set(shapes)) == 1 and config.hidden_size % shapes[0].heads == 0
    if uniform:
        config.num_attention_heads = shapes[0].heads
        config.num_key_value_heads = shapes[0].kv_heads
        config.intermediate_size = shapes[0].intermediate_size
        if hasattr(config, SHAPES_KEY):
            delattr(config, SHAPES_KEY)
    else:
        setattr(config, SHAPES_KEY, [shape.as_dict() for shape in shapes])
    model.config = config
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        model.config = original
    tokenizer.save_pretrained(out)
    if not uniform:
        path = out / "config.json"
        saved = json.loads(path.read_text())
        saved[TYPE_KEY], saved["model_type"] = saved["model_type"], STRUCTURED_TYPE
        path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    return uniform


def has_block_shapes(folder: str | Path) -> bool:
    config = Path(folder) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == STRUCTURED_TYPE


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                state[name] = handle.get_tensor(name)
    return state


def load_structured(folder: str | Path, dtype: torch.dtype | str = "auto") -> nn.Module:
    """Build the model from its config, narrow each block to its saved widths, load the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved["model_type"] = saved.pop(TYPE_KEY)
    config = AutoConfig.for_model(**saved)
    shapes = [BlockShape(**entry) for entry in getattr(config, SHAPES_KEY)]
    state = _read_safetensors(folder)
    if dtype == "auto":
        dtype = next(iter(state.values())).dtype
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    blocks = adapter_for(model).blocks(model)
    if len(blocks) != len(shapes):
        raise ValueError(f"{folder}: config lists {len(shapes)} block shapes for {len(blocks)} blocks")
    for block, shape in zip(blocks, shapes, strict=True):
        reshape_block(block, shape)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"{folder}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    return model.eval()
