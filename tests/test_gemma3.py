"""Long: the real Gemma 3 270M (sliding-window and full-attention layers) pruned past its 512-token window.

Marked `long` (about 20 minutes on 2 cores: the GGUF dequantizes for a minute, APT's refit takes about 8, the
262k-token vocabulary makes every scored window heavy): `make test-long` runs it; `make test` leaves it out to
stay in CI's budget. The setting is the pruning benchmark's (`bench_pruning --model gemma3 --samples 32`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from infra import assets
from pruning_core.data import read_rows
from pruning_core.job import calibration_set, evaluate_perplexities, prune_to_folder
from pruning_core.modeling import load_model
from pruning_core.recipe import Recipe
from tests.conftest import WIKITEXT_TEST

pytestmark = [pytest.mark.slow, pytest.mark.long]

SEQ_LEN, SAMPLES, EVAL_TOKENS = 1024, 32, 16384  # windows twice the sliding window


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return load_model(str(assets.gemma3_gguf(tmp_path_factory.mktemp("assets"))))


def test_gemma3_every_method_at_50_percent_orders_and_reloads(gemma3, tmp_path):
    dense, tokenizer = gemma3
    assert dense.config.model_type == "gemma3_text" and dense.config.sliding_window < SEQ_LEN
    assert {"sliding_attention", "full_attention"} <= set(dense.config.layer_types)
    wikitext = {"wikitext2": read_rows(str(WIKITEXT_TEST))}
    recipe = Recipe(method="wanda", sparsity=0.5, calibration_samples=SAMPLES, seq_len=SEQ_LEN)
    windows = calibration_set(tokenizer, read_rows(str(assets.text_asset("c4.utf8"))), recipe)

    def perplexity(model) -> float:
        return evaluate_perplexities(model, tokenizer, wikitext, SEQ_LEN, EVAL_TOKENS, progress=False)[
            "wikitext2"
        ].perplexity

    perplexities = {"dense": perplexity(dense)}
    for method in ("wanda", "sparsegpt", "apt"):
        model = copy.deepcopy(dense)
        out = tmp_path / method
        report = prune_to_folder(
            model, tokenizer, windows, recipe.model_copy(update={"method": method}), out, progress=False
        )
        assert 0.5 <= report.total < 0.5 + 1e-3
        perplexities[method] = perplexity(model)
        if method == "apt":
            reloaded = AutoModelForCausalLM.from_pretrained(Path(out)).eval()
            ids = windows[:1, :64]
            with torch.no_grad():
                assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)
        del model
    print(perplexities)
    # SparseGPT < Wanda, and APT near SparseGPT. At 50% on Gemma 3 with 32 x 1024 calibration APT 5 at its
    # defaults is 1.7% worse than SparseGPT (79.38 vs 78.07, issue 24's shortfall: its whole-row refit fits the
    # calibration of the 2048-input down_proj; `damping: 0.1` gives 75.50), so APT gets 2% of slack here; at 2:4
    # it is 16% better (102.62 vs 122.47).
    assert perplexities["dense"] < perplexities["sparsegpt"] < perplexities["wanda"]
    assert perplexities["apt"] <= 1.02 * perplexities["sparsegpt"]
