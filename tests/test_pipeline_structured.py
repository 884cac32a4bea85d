"""LLM-Pruner (with LoRA recovery) and OWL recipes through the same flows, checkpoints, MLflow and store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.batch import compress_batch
from infra.settings import Settings
from infra.tracking import Tracker
from pruning_core.modeling import load_model
from pruning_core.recipe import Recipe
from pruning_core.structured.groups import block_shape
from tasks import prune as prune_module
from tasks import recover as recover_module
from tasks.calibrate import CalibrationSpec, make_calibration
from tasks.fetch import snapshot_model
from tasks.prune import prune_with_checkpoints
from tasks.recover import recover_with_checkpoints
from tasks.review import batch_report, render
from tests.conftest import SHARED_DATA, WIKITEXT_VALID, batch_mapping, save_tiny

RECOVERY = {"data": str(WIKITEXT_VALID), "steps": 4, "batch_size": 2, "seq_len": 32, "learning_rate": 1e-3}
RECIPES = [
    {
        "name": "llmp",
        "method": "llm_pruner",
        "ratio": 0.1,
        "ratio_of": "all",
        "widths": "per_block",
        "keep_first": 1,
        "keep_last": 0,
        "recovery": RECOVERY,
    },
    {"name": "owl", "method": "wanda", "sparsity": 0.5, "allocation": "owl"},
]


def test_structured_and_owl_recipes_run_through_the_batch(prefect_api, pipeline_home, tmp_path, tiny_tokenizer):
    model = str(save_tiny(tmp_path / "tiny", tiny_tokenizer))
    config = batch_mapping([model], RECIPES)
    config["evaluation"] |= {"tasks": ["piqa"], "task_data": str(SHARED_DATA), "limit": 4}
    results = compress_batch(config)
    assert [r.status for r in results] == ["completed", "completed"]
    llmp, owl = results
    assert llmp.task_states["recover"] == "Completed"
    assert llmp.task_states["evaluate_before_recovery"] == "Completed"
    assert llmp.sparsity == pytest.approx(0.1, abs=0.01)  # fraction of parameters removed

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(llmp.mlflow_run_id)
    metrics = run.data.metrics
    assert metrics["parameters_after"] < metrics["parameters_before"]
    assert metrics["parameters_after"] / metrics["parameters_before"] == pytest.approx(0.9, abs=0.01)
    assert metrics["latency_ms_before"] > 0 and metrics["latency_ms_after"] > 0
    label = next(k.removeprefix("ppl.") for k in metrics if k.startswith("ppl."))
    assert metrics[f"before_recovery_ppl.{label}"] != metrics[f"ppl.{label}"]
    assert metrics["recovery.steps"] == 4
    assert len(client.get_metric_history(run.info.run_id, "recovery_loss")) == 4
    assert run.data.params["recipe.recovery.steps"] == "4"

    # The published model is the recovered one: narrower middle blocks, loaded by our loader.
    store_dir = Path(llmp.model_uri.removeprefix("file://"))
    loaded, _ = load_model(str(store_dir))
    shapes = [block_shape(b) for b in loaded.model.layers]
    assert shapes[0].intermediate_size == 128 and shapes[1].intermediate_size < 128
    assert not [n for n, _ in loaded.named_modules() if "lora" in n]

    owl_run = client.get_run(owl.mlflow_run_id)
    history = client.get_metric_history(owl_run.info.run_id, "block_sparsity")
    sparsities = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(sparsities) == 3 and sum(sparsities) / 3 == pytest.approx(0.5, abs=1e-6)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16, abs=1e-6)
    assert owl.sparsity == pytest.approx(0.5, abs=0.01)

    report = render(batch_report(Tracker(Settings()), run.data.tags["mlflow.parentRunId"]))
    assert "llmp: per-block widths, loads with secateur only" in report and metrics["loads_with_from_pretrained"] == 0
    assert "acc.piqa" in metrics and "acc.piqa" not in {
        k.removeprefix("before_recovery_") for k in metrics if k.startswith("before_")
    }
    again = compress_batch(config)
    assert again[0].task_states["prune"] == again[0].task_states["recover"] == "Cached"
    assert again[1].task_states["prune"] == "Cached"


class _Killed(RuntimeError):
    pass


def test_structured_prune_and_recovery_resume_from_their_checkpoints(
    pipeline_home, tmp_path, tiny_tokenizer, monkeypatch
):
    settings = Settings()
    snapshot = snapshot_model(str(save_tiny(tmp_path / "tiny", tiny_tokenizer)), settings)
    calibration = make_calibration(snapshot, CalibrationSpec(data=str(WIKITEXT_VALID), samples=4, seq_len=32), settings)
    recipe = Recipe(
        method="llm_pruner",
        ratio=0.1,
        ratio_of="all",
        widths="per_block",
        keep_first=1,
        keep_last=0,
        calibration_samples=4,
        seq_len=32,
    )

    # Killed after the gradient pass: the rerun reuses the checkpointed statistics.
    original = prune_module.prune_structured_to_folder
    monkeypatch.setattr(prune_module, "prune_structured_to_folder", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        prune_with_checkpoints(snapshot, calibration, recipe, settings)
    monkeypatch.setattr(prune_module, "prune_structured_to_folder", original)
    resumed = prune_with_checkpoints(snapshot, calibration, recipe, settings)
    assert resumed.resumed_gradients and resumed.resumed_from_block == 0
    fresh_settings = Settings(home=tmp_path / "fresh")
    fresh = prune_with_checkpoints(snapshot, calibration, recipe, fresh_settings)
    assert not fresh.resumed_gradients
    assert (
        json.loads(Path(resumed.path, "sparsity.json").read_text())["structure"]["block_shapes"]
        == json.loads(Path(fresh.path, "sparsity.json").read_text())["structure"]["block_shapes"]
    )

    # Recovery killed after the checkpoint at step 2 of 5: the rerun continues at step 2, same weights.
    monkeypatch.setattr(recover_module, "CHECKPOINT_EVERY", 2)
    spec = Recipe.model_validate({**recipe.model_dump(), "recovery": {**RECOVERY, "steps": 5}}).recovery
    write = recover_module.StageCheckpoint.write

    def write_then_die(self, tensors, meta):
        write(self, tensors, meta)
        raise _Killed

    monkeypatch.setattr(recover_module.StageCheckpoint, "write", write_then_die)
    with pytest.raises(_Killed):
        recover_with_checkpoints(resumed, spec, settings, snapshot)
    monkeypatch.setattr(recover_module.StageCheckpoint, "write", write)
    continued = recover_with_checkpoints(resumed, spec, settings, snapshot)
    straight = recover_with_checkpoints(fresh, spec, fresh_settings, snapshot)
    assert continued.resumed_from_step == 2 and straight.resumed_from_step == 0
    assert continued.losses == straight.losses
    a, _ = load_model(continued.path)
    b, _ = load_model(straight.path)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


def test_a_latency_batch_ships_the_depth_pruned_distilled_variant_with_its_curves(
    prefect_api, pipeline_home, tmp_path, trained_tiny_dir
):
    distill = {"kind": "distill", "data": str(WIKITEXT_VALID), "tokens": 8 * 2 * 32, "batch_size": 2}
    distill |= {"seq_len": 32, "heldout_tokens": 256, "eval_every": 4, "learning_rate": 1e-3}
    recipes = [
        {"name": "w50", "method": "wanda", "sparsity": 0.5},
        {"name": "depth", "method": "depth", "ratio": 0.5, "recovery": distill},  # 2 of 3 blocks go
    ]
    config = batch_mapping([str(trained_tiny_dir)], recipes, name="latency-batch")
    speed = {"prefill_tokens": 32, "decode_tokens": 32, "batch_sizes": [1], "repeats": 5, "warmup": 1}
    config["evaluation"] |= {"speed": speed, "generation_tokens": 0}
    config["selection"] = {"max_ppl_increase": 100.0, "objective": "latency"}
    results = compress_batch(config)
    assert [r.status for r in results] == ["completed", "completed"]
    by_name = {r.recipe_name: r for r in results}
    assert by_name["depth"].task_states["recover"] == "Completed"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("trained-tiny", "champion")
    run = client.get_run(by_name["depth"].mlflow_run_id)
    metrics = run.data.metrics
    wanda = client.get_run(by_name["w50"].mlflow_run_id).data.metrics
    gains = {name: m["gain.decode_tok_s.b1"] for name, m in (("depth", metrics), ("w50", wanda))}
    assert champion.tags["recipe_name"] == "depth", gains  # faster than dense; wanda's zeros are not
    assert metrics["blocks_removed"] == 2 and metrics["parameters_decoder_after"] < metrics["parameters_decoder_before"]
    assert metrics["gain.decode_tok_s.b1"] > 1.05 and metrics["gain.params.total"] > 1.0
    assert wanda["gain.params.total"] == 1.0 and wanda["gain.size_mib"] == pytest.approx(1.0, abs=0.1)
    # What makes wanda's timing noise to the selection: dense's parameter count and dtype, logged.
    wanda_params = client.get_run(by_name["w50"].mlflow_run_id).data.params
    assert wanda["params.total"] == wanda["dense_params.total"] and wanda_params["dtype"] == wanda_params["dense_dtype"]
    curve = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "recovery_heldout_ppl"))
    assert [step for step, _ in curve] == [0, 4, 8] and curve[-1][1] < curve[0][1]
    assert metrics["recovery.heldout_ppl"] == curve[-1][1] and metrics["recovery.tokens"] == 8 * 2 * 32
    assert len(client.get_metric_history(run.info.run_id, "recovery_loss")) == 8
    assert run.data.params["recovery_precision"] == "float32" and wanda_params["recovery_precision"] == "-"
    # The shipped folder is a stock Llama with one block.
    folder = Path(champion.source.removeprefix("file://"))
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["num_hidden_layers"] == 1
