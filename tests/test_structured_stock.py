"""Width (uniform) and depth pruning give stock configs: plain transformers loads them, without secateur."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pruning_core.job import prune_structured_to_folder
from pruning_core.recipe import Recipe
from pruning_core.structured.depth import DepthSettings, block_importance, prune_depth
from pruning_core.structured.llm_pruner import StructuredPruningError
from tests.conftest import tiny_config, tiny_model

IDS = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(1))
FAMILIES = ["llama", "qwen3", "gemma3_text"]

# Run by a bare interpreter (-I: no cwd, no PYTHONPATH) in which secateur's packages cannot be imported;
# one process loads every folder (an interpreter start and transformers' import cost seconds each).
STOCK_LOADER = """
import json, sys
for name in ("pruning_core", "tasks", "flows", "infra"):
    sys.modules[name] = None
import torch
from transformers import AutoModelForCausalLM
ids, loaded = torch.load(sys.argv[1], weights_only=True), {}
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.save(model(input_ids=ids, use_cache=False).logits, folder + "/stock-logits.pt")
    loaded[folder] = [model.config.model_type, model.config.num_hidden_layers]
print(json.dumps(loaded))
"""


def _load_with_stock_transformers(folders: list[Path], scratch: Path) -> dict[str, list]:
    torch.save(IDS, scratch / "ids.pt")
    done = subprocess.run(
        [sys.executable, "-I", "-c", STOCK_LOADER, str(scratch / "ids.pt"), *map(str, folders)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _prune(family: str, recipe: Recipe, folder: Path, tokenizer):
    model = tiny_model(family)
    report = prune_structured_to_folder(model, tokenizer, IDS, recipe, folder, progress=False)
    with torch.no_grad():
        logits = model(input_ids=IDS, use_cache=False).logits
    return model, report, logits


def _saved_parameters(folder: Path) -> int:
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())


RECIPES = {
    "width": Recipe(method="llm_pruner", ratio=0.3),
    "width-heads": Recipe(method="llm_pruner", ratio=0.3, attention_unit="q_heads"),
    "depth": Recipe(method="depth", ratio=0.3),
}
# Every recipe on the three families the issue names first; width and depth on the other stock families.
CASES = [(family, name) for family in FAMILIES for name in RECIPES] + [
    (family, name) for family in ("mistral", "qwen2-sliding", "gemma2") for name in ("width", "depth")
]


@pytest.fixture(scope="module")
def stock_loaded(tmp_path_factory, tiny_tokenizer) -> dict:
    """Every case pruned in memory and saved; then loaded by stock transformers in one bare process."""
    scratch = tmp_path_factory.mktemp("stock")
    made = {}
    for family, name in CASES:
        folder = scratch / f"{family}-{name}"
        model, report, logits = _prune(family, RECIPES[name], folder, tiny_tokenizer)
        made[(family, name)] = (folder, model, report, logits)
    loaded = _load_with_stock_transformers([folder for folder, *_ in made.values()], scratch)
    return {case: (*parts, loaded[str(parts[0])]) for case, parts in made.items()}


@pytest.mark.parametrize(("family", "recipe_name"), CASES)
def test_structured_folders_load_with_stock_transformers_and_give_the_same_logits(stock_loaded, family, recipe_name):
    folder, model, report, logits, (model_type, layers) = stock_loaded[(family, recipe_name)]
    assert report.structure.loads_with_from_pretrained
    stock = torch.load(folder / "stock-logits.pt", weights_only=True)
    torch.testing.assert_close(stock, logits, atol=1e-5, rtol=0)
    assert model_type == tiny_config(family).model_type  # the source's own type, not secateur's
    saved = json.loads((folder / "config.json").read_text())
    assert layers == saved["num_hidden_layers"] == len(model.model.layers)
    if "layer_types" in saved:
        assert len(saved["layer_types"]) == saved["num_hidden_layers"]


def test_width_pruning_gives_every_block_the_same_stock_widths(tmp_path, tiny_tokenizer):
    _, report, _ = _prune("llama", Recipe(method="llm_pruner", ratio=0.3), tmp_path / "w", tiny_tokenizer)
    shapes = list(report.structure.block_shapes.values())
    assert len(shapes) == 3 and all(shape == shapes[0] for shape in shapes)
    assert 64 % shapes[0]["heads"] == 0 and shapes[0]["intermediate_size"] % 8 == 0
    assert shapes[0]["intermediate_size"] < 128


@pytest.mark.parametrize("ratio_of", ["decoder", "all"])
@pytest.mark.parametrize("method", ["llm_pruner", "depth"])
def test_ratio_of_counts_match_the_saved_tensors(method, ratio_of, tmp_path, tiny_tokenizer):
    recipe = Recipe(method=method, ratio=0.3, ratio_of=ratio_of)
    _, report, _ = _prune("llama", recipe, tmp_path / "p", tiny_tokenizer)
    before, after = report.structure.counts_before, report.structure.counts_after
    assert before.total == before.decoder + before.embeddings and after.total == after.decoder + after.embeddings
    assert after.embeddings == before.embeddings == 256 * 64 * 2  # untied input and output tables, never pruned
    assert _saved_parameters(tmp_path / "p") == after.total == report.parameters
    counted = (before.decoder, after.decoder) if ratio_of == "decoder" else (before.total, after.total)
    removed = 1 - counted[1] / counted[0]
    assert removed == pytest.approx(report.total)
    # Whole heads, channels (multiples of 8) or blocks: near the ratio, not exactly on it.
    assert removed == pytest.approx(0.3, abs=0.12 if method == "depth" else 0.05)


def test_depth_removes_the_blocks_whose_loss_increase_is_least(tmp_path, tiny_tokenizer):
    model = tiny_model("gemma3_text")
    importance = block_importance(model, IDS, "loss", progress=False)
    result = prune_depth(model, IDS, DepthSettings(ratio=0.3), progress=False)
    assert result.importance == importance and len(result.removed) == 1
    assert result.removed == [min(range(4), key=importance.__getitem__)]
    kept = [i for i in range(4) if i not in result.removed]
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    assert model.config.layer_types == [types[i] for i in kept] and model.config.num_hidden_layers == 3
    assert [block.self_attn.layer_idx for block in model.model.layers] == [0, 1, 2]


def test_depth_influence_is_one_minus_the_cosine_of_block_input_and_output():
    model = tiny_model("llama")
    scores = block_importance(model, IDS, "influence", progress=False)
    captured = {}

    def capture(module, args, kwargs, output):
        captured.update(x=args[0] if args else kwargs["hidden_states"], y=output)

    handle = model.model.layers[1].register_forward_hook(capture, with_kwargs=True)
    with torch.no_grad():
        cosines = []
        for row in IDS:
            model(input_ids=row.unsqueeze(0), use_cache=False)
            y = captured["y"] if isinstance(captured["y"], torch.Tensor) else captured["y"][0]
            cosines.append(torch.nn.functional.cosine_similarity(captured["x"], y, dim=-1).flatten())
    handle.remove()
    assert scores[1] == pytest.approx(float((1 - torch.cat(cosines)).mean()), rel=1e-5)


def test_depth_refuses_a_ratio_of_no_block_or_every_block():
    with pytest.raises(StructuredPruningError, match="at least one block"):
        prune_depth(tiny_model("llama"), IDS, DepthSettings(ratio=0.05), progress=False)
    with pytest.raises(StructuredPruningError, match="keeps at least one"):
        prune_depth(tiny_model("llama"), IDS, DepthSettings(ratio=0.95), progress=False)


def test_structured_recipes_refuse_fields_of_the_other_kind_and_keep_their_meaning_in_the_fingerprint():
    with pytest.raises(ValueError, match="add widths: per_block"):
        Recipe(method="llm_pruner", ratio=0.2, keep_first=2)
    with pytest.raises(ValueError, match="'attention_unit' applies to llm_pruner"):
        Recipe(method="depth", ratio=0.2, attention_unit="kv_groups")
    with pytest.raises(ValueError, match="'depth_importance' applies to depth"):
        Recipe(method="llm_pruner", ratio=0.2, depth_importance="influence")
    with pytest.raises(ValueError, match="'ratio_of' applies to structured"):
        Recipe(method="wanda", sparsity=0.5, ratio_of="all")
    canonical = json.loads(Recipe(method="llm_pruner", ratio=0.2).canonical_json())
    assert canonical["widths"] == "uniform" and canonical["ratio_of"] == "decoder"
    assert "widths" not in Recipe(method="wanda", sparsity=0.5).canonical_json()
    per_block = Recipe(method="llm_pruner", ratio=0.2, widths="per_block", ratio_of="all")
    assert per_block.structured_settings().kept_whole == (4, 2)
    assert per_block.fingerprint() != Recipe(method="llm_pruner", ratio=0.2).fingerprint()


def test_width_recipes_default_to_activation_importance_and_the_refit_and_changed_their_method_version():
    from pruning_core.methods import method_version

    recipe = Recipe(method="llm_pruner", ratio=0.2)
    settings = recipe.structured_settings()
    assert (settings.scores, settings.refit) == ("activation", "least_squares")
    assert Recipe(method="llm_pruner", ratio=0.2, widths="per_block").structured_settings().scores == "element1"
    assert method_version("llm_pruner") == "3"  # part of every prune fingerprint: no result of version 2 reused
    without = Recipe(method="llm_pruner", ratio=0.2, channel_refit="none")
    assert json.loads(without.canonical_json())["channel_refit"] == "none"
    assert "channel_refit" not in json.loads(recipe.canonical_json())
    with pytest.raises(ValueError, match="'channel_refit' applies to llm_pruner"):
        Recipe(method="depth", ratio=0.2, channel_refit="none")
