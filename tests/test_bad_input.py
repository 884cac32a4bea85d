"""Bad input is bounded before any work: YAML aliases, huge batches, memory estimates, broken tokenizers/GGUFs."""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from flows.batch_config import BatchConfig
from flows.cli import main
from infra import assets
from pruning_core.data import calibration_windows
from pruning_core.memory import MemoryBudgetError, model_shape
from pruning_core.modeling import ModelSpecError, load_model, load_tokenizer
from pruning_core.recipe import MAX_YAML_BYTES, Recipe
from tests.conftest import WIKITEXT_TEST, WIKITEXT_VALID, batch_mapping

ROOT = Path(__file__).resolve().parents[1]
ERROR_LINE_BOUND = 2100  # flows.cli.ERROR_LINE_CHARS plus the prefix and the "... (N more chars)" note


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SECATEUR_MEMORY_LIMIT_GIB", raising=False)
    return tmp_path / "home"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secateur: error: "), err
    return lines[0]


# --- YAML --------------------------------------------------------------------------------------------

LAUGHS = "\n".join(
    [
        "name: bomb",
        'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
        *(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)),
        "models: [*i]",
    ]
)


def test_a_yaml_alias_bomb_is_refused_at_once_naming_the_file(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(LAUGHS)
    started = time.perf_counter()
    assert main(["run", str(path)]) == 2
    assert time.perf_counter() - started < 2.0
    line = one_error_line(capsys)
    assert f"{path}: more than 2,000,000 YAML nodes once its aliases are expanded" in line
    # the same reader guards recipe files, and an alias inside its own anchor is refused too
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(LAUGHS.replace("models", "skip"))
    with pytest.raises(ValueError, match=r"recipe\.yaml: more than"):
        Recipe.read_yaml(recipe)
    recipe.write_text("skip: &s [q_proj, *s]\n")
    with pytest.raises(ValueError, match=r"recipe\.yaml: alias \*s refers to a node that contains it"):
        Recipe.read_yaml(recipe)


def test_small_aliases_still_load_and_oversized_or_deep_files_are_refused(tmp_path, tiny_model_dir):
    mapping = batch_mapping([str(tiny_model_dir)], [])
    del mapping["recipes"]
    recipes = "recipes:\n- &base {name: m, method: magnitude, sparsity: 0.5}\n- <<: *base\n  name: m2\n"
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(mapping) + recipes)
    assert [(r.name, r.sparsity) for r in BatchConfig.from_yaml(path).recipes] == [("m", 0.5), ("m2", 0.5)]
    big = tmp_path / "big.yaml"
    big.write_text("#" * (MAX_YAML_BYTES + 1))
    with pytest.raises(ValueError, match=rf"big\.yaml: {MAX_YAML_BYTES + 1:,} bytes is more than a batch file"):
        BatchConfig.from_yaml(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 200 + "]" * 200)
    with pytest.raises(ValueError, match=r"deep\.yaml: nested deeper than 32 levels"):
        BatchConfig.from_yaml(deep)


# --- long error lines --------------------------------------------------------------------------------


def test_ten_thousand_bad_recipes_give_one_short_line_from_the_real_cli(tmp_path, tiny_model_dir):
    recipes = [{"name": f"r{i}", "method": "magnitude", "sparsity": 1.5} for i in range(10_000)]
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(batch_mapping([str(tiny_model_dir)], recipes)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < ERROR_LINE_BOUND, lines[0][:3000]
    assert lines[0].startswith("secateur: error: invalid batch file: recipes.0.sparsity: Input should be less than 1")
    assert lines[0].endswith("; and 9,995 more problems")


def test_a_huge_value_in_an_error_is_cut_keeping_the_first_problem(tmp_path, tiny_model_dir, capsys):
    recipes = [{"name": "twin", "method": "magnitude", "sparsity": 0.5}] * 2
    recipes += [{"name": f"{'n' * 90}{i}", "method": "magnitude", "sparsity": 0.5} for i in range(10_000)]
    path = tmp_path / "batch.yaml"
    path.write_text(json.dumps(batch_mapping([str(tiny_model_dir)], recipes)))  # JSON is YAML, with no aliases
    assert main(["run", str(path)]) == 2
    line = one_error_line(capsys)
    assert len(line) < ERROR_LINE_BOUND
    assert line.startswith("secateur: error: invalid batch file: recipes: recipe names must be unique, got ['twin',")
    assert "more chars)" in line


# --- tokenizers and GGUF files -----------------------------------------------------------------------


def test_a_truncated_tokenizer_is_one_line_naming_the_file(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:2000])
    with pytest.raises(ModelSpecError, match=r"tokenizer\.json: not valid JSON"):
        load_tokenizer(str(folder))  # what building a calibration set calls first
    assert main(["evaluate", str(folder), "--perplexity", str(WIKITEXT_TEST)]) == 2
    assert f"{tokenizer}: not valid JSON" in one_error_line(capsys)
    tokenizer.write_text('{"version": "1.0"}')  # JSON, but no tokenizer: the tokenizers library's own message
    with pytest.raises(ModelSpecError, match=rf"{folder}: cannot load the tokenizer \(.+\)"):
        load_tokenizer(str(folder))


@pytest.fixture(scope="module")
def smollm2_bytes() -> bytes:
    with assets.smollm2_gguf().open("rb") as handle:
        return handle.read(3_000_000)  # the header (1.8 MB) and the first tensors


@pytest.mark.parametrize(
    ("length", "problem"),
    [
        (16_000, "truncated GGUF file: an array of 49,152 values cannot fit"),
        (3_000_000, "truncated GGUF file: its tensors end at byte 98,362,432, the file has 3,000,000"),
    ],
)
def test_a_truncated_gguf_is_one_line_naming_the_file(tmp_path, smollm2_bytes, capsys, length, problem):
    path = tmp_path / "SmolLM2.gguf"
    path.write_bytes(smollm2_bytes[:length])
    assert main(["evaluate", str(path), "--perplexity", str(WIKITEXT_TEST)]) == 2
    assert one_error_line(capsys) == f"secateur: error: {path}: {problem}"
    with pytest.raises(ModelSpecError, match=problem):
        load_tokenizer(str(path))


def test_hostile_gguf_counts_fail_without_reading_on(tmp_path):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0))
    with pytest.raises(ModelSpecError, match=r"hostile\.gguf: truncated GGUF file: 1,152,921,504,606,846,976 tensors"):
        load_model(str(path))
    path.write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ModelSpecError, match=r"hostile\.gguf: not a GGUF file"):
        load_model(str(path))


def test_the_real_gguf_is_sized_from_its_header():
    shape = model_shape(str(assets.smollm2_gguf()))
    assert (shape.parameters, shape.hidden_size, shape.widest, shape.layers, shape.vocab_size) == (
        134_515_008,
        576,
        1536,
        30,
        49152,
    )


# --- memory estimates --------------------------------------------------------------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize(
    "overrides",
    [
        {"hidden_size": 1_000_000, "intermediate_size": 4_000_000},  # a plain config with giant widths
        # a structurally pruned folder: load_structured builds the config's widths before narrowing
        {"model_type": "secateur_structured", "secateur_model_type": "llama", "intermediate_size": 10**9},
    ],
)
def test_a_giant_config_is_refused_before_any_weight_is_allocated(tmp_path, tiny_model_dir, overrides):
    folder = tmp_path / "giant"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **overrides}))
    peak, started = _peak_rss_mib(), time.perf_counter()
    with pytest.raises(MemoryBudgetError, match=rf"loading {folder} needs at least [\d,.]+ GiB of RAM \(weights"):
        load_model(str(folder))
    assert time.perf_counter() - started < 2.0
    assert _peak_rss_mib() - peak < 256  # nothing near the model's size was ever allocated


def test_calibration_beyond_memory_is_refused_before_any_work(tmp_path, tiny_model_dir, state_dir, capsys):
    argv = ["prune", str(tiny_model_dir), "--method", "sparsegpt", "--sparsity", "0.5"]
    argv += ["--calibration", str(WIKITEXT_VALID), "--samples", "100000", "--seq-len", "131072"]
    started = time.perf_counter()
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - started < 5.0
    line = one_error_line(capsys)
    assert f"pruning {tiny_model_dir} needs at least " in line
    assert "block inputs and outputs (13,107,200,000 tokens x 64 wide)" in line
    assert line.endswith("lower calibration samples or seq_len, or set SECATEUR_MEMORY_LIMIT_GIB")
    assert not (state_dir / "calibration").exists() and not (tmp_path / "out").exists()
    # Drawn anywhere else (a pool worker), the windows are sized before they are allocated.
    with pytest.raises(MemoryBudgetError, match=r"calibration needs at least 97\.7 GiB of RAM"):
        calibration_windows(torch.arange(131_073), 100_000, 131_072, seed=0)


def test_a_batch_over_the_memory_setting_is_refused_before_prefect_starts(
    tmp_path, tiny_model_dir, state_dir, capsys, monkeypatch
):
    monkeypatch.setenv("SECATEUR_MEMORY_LIMIT_GIB", "0.0001")
    path = tmp_path / "batch.yaml"
    recipes = [{"name": "s", "method": "sparsegpt", "sparsity": 0.5}]
    path.write_text(yaml.safe_dump(batch_mapping([str(tiny_model_dir)], recipes)))
    assert main(["run", str(path)]) == 2
    line = one_error_line(capsys)
    assert f"pruning {tiny_model_dir} needs at least " in line and "more than the limit 0.1 MiB" in line
    assert not (state_dir / "logs").exists()  # the batch never started (its log file is its first act)
