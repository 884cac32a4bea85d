"""The Prefect pipeline end to end on tiny models: real Prefect API, MLflow on SQLite, real artifact stores."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from flows.batch import PairsFailed, compress_batch
from flows.cli import main
from infra.settings import Settings
from infra.tracking import Tracker
from tasks.review import batch_report, render
from tests.conftest import SHARED_DATA, batch_mapping, save_tiny

RECIPES = [
    {"name": "wanda50", "method": "wanda", "sparsity": 0.5},
    {"name": "sgpt24", "method": "sparsegpt", "pattern": "2:4"},
]


@pytest.fixture
def two_models(tmp_path, tiny_tokenizer) -> list[str]:
    return [str(save_tiny(tmp_path / f"tiny-{seed}", tiny_tokenizer, seed=seed)) for seed in (0, 1)]


def _runs(tmp_path: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, runs


def test_batch_end_to_end_tracks_publishes_and_reruns_nothing(prefect_api, pipeline_home, tmp_path, two_models, capsys):
    from transformers import AutoModelForCausalLM

    config = batch_mapping(two_models, RECIPES)
    config["evaluation"] |= {"tasks": ["piqa", "arc_easy"], "task_data": str(SHARED_DATA), "limit": 4}
    results = compress_batch(config)
    assert [(Path(r.model).name, r.recipe_name, r.status) for r in results] == [
        ("tiny-0", "wanda50", "completed"),
        ("tiny-0", "sgpt24", "completed"),
        ("tiny-1", "wanda50", "completed"),
        ("tiny-1", "sgpt24", "completed"),
    ]
    assert all(r.task_states["prune"] == "Completed" for r in results)
    # The dense baseline and the calibration set are computed once per model, shared by its recipes.
    assert [r.task_states["evaluate_dense"] for r in results] == ["Completed", "Cached", "Completed", "Cached"]
    assert [r.task_states["calibrate"] for r in results] == ["Completed", "Cached", "Completed", "Cached"]

    client, runs = _runs(tmp_path, "test-batch")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 4
    assert parents[0].info.status == "FINISHED" and parents[0].data.metrics["pairs"] == 4
    for child in children:
        metrics = child.data.metrics
        assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert 1 < metrics["ppl.wiki"] < 1000 and 1 < metrics["dense_ppl.wiki"] < 1000
        assert {"seconds.prune", "seconds.evaluate", "seconds.fetch", "peak_rss_mib"} <= metrics.keys()
        history = client.get_metric_history(child.info.run_id, "block_error")
        assert sorted(m.step for m in history) == [0, 1, 2] and all(m.value > 0 for m in history)
        assert child.data.params["recipe.method"] in {"wanda", "sparsegpt"}
        assert child.data.params["calibration.samples"] == "8"
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"block_errors.png", "recipe.yaml", "report.json", "model_uri.txt"} <= artifacts
        assert child.data.tags["model_uri"].startswith("file://")
        for name in ("acc.piqa", "acc_norm.piqa", "acc.arc_easy", "dense_acc.piqa"):
            assert 0 <= metrics[name] <= 1, name
        assert child.data.params["evaluation.split.arc_easy"] == "test"
        assert child.data.params["evaluation.items.piqa"] == "4"
        assert metrics["model_size_mib"] > 0 and metrics["dense_size_mib"] > 0
        assert "generations.txt" in artifacts

    # The batch run carries the review: the table in three formats, plots, the generations side by side.
    parent_id = parents[0].info.run_id
    review = Path(client.download_artifacts(parent_id, "", str(tmp_path / "review")))
    assert {"report.txt", "report.md", "report.csv", "generations.md", "summary.txt"} <= {
        p.name for p in review.iterdir()
    }
    plots = sorted(p.name for p in (review / "plots").iterdir())
    assert plots == [
        "accuracy.tiny-0.png",
        "accuracy.tiny-1.png",
        "block_errors.png",
        "perplexity_vs_sparsity.wiki.png",
    ]
    assert all((review / "plots" / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for name in plots)
    assert "[dense] The capital of France is" in (review / "generations.md").read_text()

    capsys.readouterr()
    assert main(["report", "test-batch", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["model"], r["recipe"]) for r in rows] == [
        ("tiny-0", "dense"),
        ("tiny-0", "wanda50"),
        ("tiny-0", "sgpt24"),
        ("tiny-1", "dense"),
        ("tiny-1", "wanda50"),
        ("tiny-1", "sgpt24"),
    ]
    wanda0 = next(
        c.data.metrics
        for c in children
        if c.data.params["recipe_name"] == "wanda50" and c.data.params["model"].endswith("tiny-0")
    )
    assert float(rows[1]["ppl wiki"]) == pytest.approx(wanda0["ppl.wiki"], abs=1e-3)
    assert float(rows[1]["delta ppl wiki"]) == pytest.approx(wanda0["ppl.wiki"] - wanda0["dense_ppl.wiki"], abs=1e-3)
    assert float(rows[0]["acc.piqa"]) == pytest.approx(wanda0["dense_acc.piqa"], abs=1e-4)
    assert rows[0]["sparsity"] == "-" and float(rows[1]["sparsity"]) == pytest.approx(0.5, abs=1e-3)
    assert (review / "report.csv").read_text() == render(batch_report(Tracker(Settings()), parent_id), "csv")
    assert main(["report", parent_id, "--format", "markdown"]) == 0
    markdown = capsys.readouterr().out
    assert "| tiny-0 | wanda50 | finished | 0.500 |" in markdown
    assert "- perplexity seq_len: wiki 64" in markdown
    assert "- tasks: arc_easy (test, 4 items); piqa (validation, 4 items)" in markdown

    for result in results:
        stored = Path(result.model_uri.removeprefix("file://"))
        manifest = json.loads((stored / "MANIFEST.json").read_text())
        assert "model.safetensors" in manifest["files"]
        model = AutoModelForCausalLM.from_pretrained(stored)
        weight = model.model.layers[1].mlp.down_proj.weight
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-6)
        png = (stored.parent / "report" / "block_errors.png").read_bytes()
        assert png.startswith(b"\x89PNG")

    models_dir = pipeline_home / "models"
    before = {p: p.stat().st_mtime_ns for p in models_dir.rglob("*.safetensors")}
    again = compress_batch(config)
    assert all(r.task_states["prune"] == "Cached" for r in again), "a rerun prunes nothing"
    assert all(r.task_states["evaluate"] == "Cached" for r in again)
    assert {p: p.stat().st_mtime_ns for p in models_dir.rglob("*.safetensors")} == before
    assert [r.perplexity for r in again] == [r.perplexity for r in results]


def test_failed_pair_does_not_stop_the_others_and_retry_reruns_only_it(
    prefect_api, pipeline_home, tmp_path, tiny_tokenizer, capsys
):
    good = str(save_tiny(tmp_path / "tiny-llama", tiny_tokenizer))
    unsupported = str(save_tiny(tmp_path / "tiny-gpt2", tiny_tokenizer, family="opt"))
    # Make the second model an architecture the engine does not support, discovered only at prune time.
    config_path = Path(unsupported) / "config.json"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=2)).save_pretrained(unsupported)
    assert json.loads(config_path.read_text())["model_type"] == "gpt2"

    config = batch_mapping([good, unsupported], RECIPES[:1], name="mixed")
    with pytest.raises(PairsFailed, match=r"1 of 2 pairs failed: tiny-gpt2 x wanda50: unsupported architecture"):
        compress_batch(config)
    records = sorted((pipeline_home / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    record = json.loads(records[-1].read_text())
    assert [r["status"] for r in record["results"]] == ["completed", "failed"]

    _, runs = _runs(tmp_path, "mixed")
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert {r.info.run_name for r in failed} == {f"{unsupported}/wanda50", f"mixed/{record['flow_run_name']}"}

    capsys.readouterr()
    assert main(["retry", record["flow_run_id"], "--json"]) == 1
    out, err = capsys.readouterr()
    assert "retrying 1 failed or unfinished pairs" in out
    assert err.strip().splitlines()[-1].startswith("secateur: error: 1 of 1 pairs failed; rerun them with:")
    latest = json.loads(
        sorted((pipeline_home / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)[-1].read_text()
    )
    assert [(Path(r["model"]).name, r["status"]) for r in latest["results"]] == [("tiny-gpt2", "failed")]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: c["recipes"][0].update(method="pruneit"), "recipes.0.method: unknown method 'pruneit'"),
        (lambda c: c["recipes"][1].update(sparsity=1.5, pattern=None), "recipes.1.sparsity: Input should be less"),
        (lambda c: c["models"].append("/no/such/model"), "models.2: model not found: /no/such/model"),
        (lambda c: c["calibration"].update(samples=0), "calibration.samples: Input should be greater"),
        (lambda c: c.pop("evaluation"), "evaluation: Field required"),
    ],
)
def test_bad_batch_file_fails_before_any_work(pipeline_home, tmp_path, two_models, capsys, change, field):
    config = batch_mapping(two_models, [dict(r) for r in RECIPES])
    change(config)
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("secateur: error: invalid batch file: ")
    assert field in err
    assert not (pipeline_home / "runs").exists() and not (pipeline_home / "models").exists()


def test_unreachable_s3_keeps_the_pruned_model_and_a_rerun_publishes_it(
    prefect_api, pipeline_home, tmp_path, two_models, s3_bucket, monkeypatch
):
    from tests.test_artifacts import _closed_port

    monkeypatch.setenv("SECATEUR_ARTIFACTS", f"s3://{s3_bucket}/nightly")
    monkeypatch.setenv("SECATEUR_TASK_RETRIES", "1")
    monkeypatch.setenv("SECATEUR_RETRY_DELAY_SECONDS", "0")
    monkeypatch.setenv("SECATEUR_UPLOAD_ATTEMPTS", "2")
    reachable = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    config = batch_mapping(two_models[:1], RECIPES[:1], name="s3-batch")
    # S3 goes away after the batch's preflight found it (test_hardening covers a store down from the start).
    monkeypatch.setattr("flows.batch.check_services", lambda settings: None)
    with pytest.raises(PairsFailed, match=r"S3 (read|upload) failed at http://127\.0\.0\.1:\d+"):
        compress_batch(config)
    pruned = list((pipeline_home / "models").rglob("model.safetensors"))
    assert len(pruned) == 1, "the pruned model is kept locally"

    monkeypatch.setenv("AWS_ENDPOINT_URL", reachable)
    from mlflow.store.artifact.s3_artifact_repo import _cached_get_s3_client

    _cached_get_s3_client.cache_clear()  # MLflow keeps its S3 client (and the endpoint it read) per process
    (result,) = compress_batch(config)
    assert result.task_states["prune"] == "Cached"
    assert result.model_uri.startswith(f"s3://{s3_bucket}/nightly/tiny-0/")
    import boto3

    key = result.model_uri.removeprefix(f"s3://{s3_bucket}/") + "/MANIFEST.json"
    manifest = json.loads(boto3.client("s3").get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    assert manifest["files"]["model.safetensors"]["sha256"]
    torch.testing.assert_close(float(result.sparsity), 0.5, atol=1e-6, rtol=0)


def test_a_cache_entry_whose_files_are_gone_is_recomputed(prefect_api, pipeline_home, two_models):
    import shutil

    config = batch_mapping(two_models[:1], RECIPES[:1], name="deleted")
    (first,) = compress_batch(config)
    shutil.rmtree(pipeline_home / "models")
    (second,) = compress_batch(config)
    assert second.task_states["prune"] == "Completed" and second.perplexity == first.perplexity
    assert list((pipeline_home / "models").rglob("model.safetensors"))
