"""The CLI contract: prune and evaluate, --json last line, one-line errors with non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from flows.cli import main
from tests.conftest import SHARED_DATA, WIKITEXT_TEST, WIKITEXT_VALID

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """`secateur prune` works under the state dir (checkpoints, the finished model): one per test."""
    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_prune_saves_a_loadable_model_with_its_sparsity_report(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    code, stdout, stderr = run_cli(
        capsys,
        "prune",
        tiny_model_dir,
        "--method",
        "sparsegpt",
        "--pattern",
        "2:4",
        "--calibration",
        WIKITEXT_VALID,
        "--samples",
        4,
        "--seq-len",
        64,
        "--out",
        out,
        "--json",
    )
    assert code == 0, stderr
    result = last_json(stdout)
    assert result["out"] == str(out) and result["method"] == "sparsegpt" and result["target"] == "2:4"
    assert result["sparsity"] == 0.5 and result["seconds"] > 0
    report = json.loads((out / "sparsity.json").read_text())
    assert report["total"] == 0.5 and len(report["layers"]) == 3 * 7
    assert report["recipe"]["calibration_samples"] == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    q = model.model.layers[1].self_attn.q_proj.weight
    assert float((q == 0).float().mean()) == 0.5
    assert (out / "tokenizer.json").is_file() and list(out.glob("*.safetensors"))
    assert not list(out.glob("*.bin")), "no pickled weights"


def test_llm_pruner_with_recovery_reports_parameters_and_saves_a_smaller_model(capsys, tiny_model_dir, tmp_path):
    from pruning_core.modeling import load_model
    from pruning_core.structured.groups import block_shape

    out = tmp_path / "smaller"
    code, stdout, stderr = run_cli(
        capsys,
        *("prune", tiny_model_dir, "--method", "llm_pruner", "--ratio", 0.1, "--importance", "element2"),
        *("--widths", "per_block", "--ratio-of", "all", "--keep-first", 1, "--keep-last", 0),
        *("--recovery-steps", 3, "--recovery-data", WIKITEXT_VALID),
        *("--calibration", WIKITEXT_VALID, "--samples", 4, "--seq-len", 32, "--out", out, "--json"),
    )
    assert code == 0, stderr
    result = last_json(stdout)
    assert result["parameters_after"] < result["parameters_before"]
    assert result["removed"] == pytest.approx(0.1, abs=0.01) and result["target"] == "10% of all parameters (width)"
    assert result["latency_ms_before"] > 0 and result["loads_with_from_pretrained"] is False
    assert len(result["recovery_loss"]) == 2 and "LoRA recovery: 3 steps" in stdout
    report = json.loads((out / "sparsity.json").read_text())
    assert report["recipe"]["importance"] == "element2" and len(report["recovery"]["losses"]) == 3
    model, _ = load_model(str(out))
    assert [block_shape(b).intermediate_size == 128 for b in model.model.layers] == [True, False, False]
    assert sum(p.numel() for p in model.parameters()) == result["parameters_after"]


def test_depth_pruning_with_distillation_from_the_cli_gives_a_stock_folder(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "shallower"
    code, stdout, stderr = run_cli(
        capsys,
        *("prune", tiny_model_dir, "--method", "depth", "--ratio", 0.34, "--distill-tokens", 2048),
        *("--recovery-data", WIKITEXT_VALID, "--calibration", WIKITEXT_VALID, "--samples", 4, "--seq-len", 32),
        *("--out", out, "--json"),
    )
    assert code == 0, stderr
    result = last_json(stdout)
    assert result["target"] == "34% of decoder parameters (blocks)" and result["loads_with_from_pretrained"] is True
    assert "blocks removed: " in stdout and "loads with: stock transformers from_pretrained" in stdout
    assert "distillation: 2 steps" in stdout  # 2048 tokens in batches of 4 x 256
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2


def test_llm_pruner_with_nothing_to_prune_fails_after_loading_with_one_error_line(capsys, tiny_model_dir, tmp_path):
    code, _stdout, stderr = run_cli(
        capsys,
        *("prune", tiny_model_dir, "--method", "llm_pruner", "--ratio", 0.1, "--widths", "per_block"),
        *("--calibration", WIKITEXT_VALID, "--out", tmp_path / "o"),
    )
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert code != 0 and errors == [
        "secateur: error: nothing to prune: the model has 3 blocks and keep_first=4, keep_last=2"
    ]
    assert not (tmp_path / "o").exists()


def test_owl_allocation_from_the_cli(capsys, tiny_model_dir, tmp_path):
    code, stdout, stderr = run_cli(
        capsys,
        *("prune", tiny_model_dir, "--method", "wanda", "--sparsity", 0.5, "--allocation", "owl"),
        *("--calibration", WIKITEXT_VALID, "--samples", 4, "--seq-len", 32, "--out", tmp_path / "owl", "--json"),
    )
    assert code == 0, stderr
    result = last_json(stdout)
    assert sum(result["block_sparsity"]) / 3 == pytest.approx(0.5) and len(set(result["block_sparsity"])) == 3
    assert result["sparsity"] == pytest.approx(0.5, abs=0.01) and result["target"] == "50% (OWL)"


def test_prune_with_recipe_file_and_flag_override(capsys, tiny_model_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: wanda\nsparsity: 0.5\nskip: ['*.down_proj']\nseq_len: 64\ncalibration_samples: 2\n")
    out = tmp_path / "pruned"
    code, _stdout, stderr = run_cli(
        capsys,
        "prune",
        tiny_model_dir,
        "--recipe",
        recipe,
        "--sparsity",
        "0.75",
        "--calibration",
        WIKITEXT_VALID,
        "--out",
        out,
        "--json",
    )
    assert code == 0, stderr
    report = json.loads((out / "sparsity.json").read_text())
    assert report["recipe"]["sparsity"] == 0.75 and report["recipe"]["skip"] == ["*.down_proj"]
    layers = report["layers"]
    assert layers["model.layers.0.mlp.down_proj.weight"] == 0.0
    assert layers["model.layers.0.mlp.up_proj.weight"] == 0.75


def test_evaluate_reports_perplexity_per_dataset_and_tokens_scored(capsys, tiny_model_dir, tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": line}) for line in WIKITEXT_VALID.read_text().splitlines()[:200]))
    spec = f"jsonl:{jsonl}:text"
    code, stdout, stderr = run_cli(
        capsys,
        "evaluate",
        tiny_model_dir,
        "--perplexity",
        WIKITEXT_TEST,
        "--perplexity",
        spec,
        "--seq-len",
        64,
        "--max-tokens",
        640,
        "--json",
    )
    assert code == 0, stderr
    result = last_json(stdout)
    assert set(result["perplexity"]) == {str(WIKITEXT_TEST), spec}
    assert all(v > 1 for v in result["perplexity"].values())
    assert result["tokens_scored"] == {str(WIKITEXT_TEST): 640, spec: 640}
    assert "640" in stdout and "seq_len 64" in stdout


def test_evaluate_runs_zero_shot_tasks_from_a_data_folder(capsys, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "home"))
    code, stdout, stderr = run_cli(
        capsys,
        "evaluate",
        tiny_model_dir,
        "--task",
        "piqa",
        "--task",
        "hellaswag",
        "--task-data",
        SHARED_DATA,
        "--limit",
        3,
        "--json",
    )
    assert code == 0, stderr
    result = last_json(stdout)
    assert result["tasks"]["piqa"]["items"] == 3 and 0 <= result["tasks"]["piqa"]["acc"] <= 1
    assert result["tasks"]["piqa"]["split"] == "validation"
    assert "hellaswag" in result["skipped_tasks"] and "hellaswag        skipped" in stdout


def test_report_of_an_unknown_batch_run_is_one_line(capsys, pipeline_home):
    code, _stdout, stderr = run_cli(capsys, "report", "no-such-batch")
    assert code == 2 and stderr.strip().splitlines() == [
        f"secateur: error: no batch run 'no-such-batch' in sqlite:///{pipeline_home.parent / 'mlflow.db'} "
        "(give an MLflow run id, a flow run id or name, or a batch name)"
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [
                "prune",
                "/no/such/model",
                "--method",
                "wanda",
                "--sparsity",
                "0.5",
                "--calibration",
                "{wiki}",
                "--out",
                "{tmp}/o",
            ],
            "model not found: /no/such/model",
        ),
        (
            [
                "prune",
                "{model}",
                "--method",
                "wanda",
                "--sparsity",
                "1.5",
                "--calibration",
                "{wiki}",
                "--out",
                "{tmp}/o",
            ],
            "invalid recipe: sparsity: Input should be less than 1",
        ),
        (
            [
                "prune",
                "{model}",
                "--method",
                "wanda",
                "--sparsity",
                "0.5",
                "--calibration",
                "{tmp}/missing.txt",
                "--out",
                "{tmp}/o",
            ],
            "data file not found",
        ),
        (
            ["prune", "{model}", "--method", "apt", "--pattern", "3:2", "--calibration", "{wiki}", "--out", "{tmp}/o"],
            "pattern N:M needs 0 < N < M",
        ),
        (
            ["prune", "{model}", "--recipe", "{tmp}/none.yaml", "--calibration", "{wiki}", "--out", "{tmp}/o"],
            "recipe file not found",
        ),
        (
            "prune {model} --method llm_pruner --ratio 0.1 --recovery-steps 5 --calibration {wiki} --out {tmp}/o".split(
                " "
            ),
            "recovery.data: Field required",
        ),
        (
            (
                "prune {model} --method llm_pruner --ratio 0.1 --recovery-steps 5 --recovery-data {tmp}/none.txt "
                "--calibration {wiki} --out {tmp}/o"
            ).split(),
            "recovery.data: data file not found:",
        ),
        (
            "prune {model} --method wanda --pattern 2:4 --allocation owl --calibration {wiki} --out {tmp}/o".split(),
            "N:M patterns are per group",
        ),
        (["evaluate", "{tmp}/x.gguf", "--perplexity", "{wiki}"], "model file not found"),
        (["evaluate", "{model}", "--task", "piqa", "--task-data", "{tmp}/none"], "task data folder not found"),
        (["evaluate", "{model}"], "give --perplexity DATA, --task NAME, or both"),
        (["evaluate", "{model}", "--task", "piqa", "--task", "no_such_task"], "unknown lm-eval task(s): no_such_task"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_nonzero(capsys, tiny_model_dir, tmp_path, argv, message):
    filled = [a.format(wiki=WIKITEXT_VALID, tmp=tmp_path, model=tiny_model_dir) for a in argv]
    code, _stdout, stderr = run_cli(capsys, *filled)
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secateur: error: ") and message in lines[0], stderr
    assert not (tmp_path / "o").exists()


def test_console_script_help_and_json_exit_codes(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv in (["prune", "--help"],):  # each run imports torch: one is enough to check the entry point
        done = subprocess.run([sys.executable, "-m", "flows.cli", *argv], capture_output=True, text=True, env=env)
        assert done.returncode == 0 and "usage: secateur" in done.stdout
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "prune",
            str(tiny_model_dir),
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--calibration",
            str(WIKITEXT_VALID),
            "--samples",
            "2",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path / "m"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["sparsity"] == 0.5
    assert "magnitude blocks" in done.stderr, "a progress bar per block"


def test_prune_refuses_a_non_empty_out_before_any_work_and_overwrite_replaces_it(
    capsys, tiny_model_dir, tmp_path, state_dir
):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["prune", tiny_model_dir, "--method", "magnitude", "--sparsity", 0.5, "--calibration", WIKITEXT_VALID]
    argv += ["--samples", 2, "--seq-len", 32, "--out", out, "--json"]
    code, _stdout, stderr = run_cli(capsys, *argv)
    assert code == 2 and stderr.strip().splitlines() == [
        f"secateur: error: --out {out} is not empty (give --overwrite to replace it)"
    ]
    assert (out / "notes.txt").read_text() == "mine" and not (state_dir / "models").exists()

    code, stdout, stderr = run_cli(capsys, *argv, "--overwrite")
    assert code == 0, stderr
    first = last_json(stdout)
    assert not (out / "notes.txt").exists() and (out / "sparsity.json").is_file()
    assert not list(out.parent.glob(".taken.tmp-*")), "no staging folder left"

    # The same prune again: the finished model in the state dir is reused, bit for bit.
    weights = (out / "model.safetensors").read_bytes()
    code, stdout, stderr = run_cli(capsys, *argv, "--overwrite")
    assert code == 0, stderr
    assert last_json(stdout)["run_fingerprint"] == first["run_fingerprint"]
    assert (out / "model.safetensors").read_bytes() == weights
    assert "magnitude blocks" not in stderr, "nothing pruned the second time"
