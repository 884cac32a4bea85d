"""Which variant ships, end to end: a batch with a quality budget registers its choice in the MLflow Model
Registry (real SQLite store), moves `champion`, says why when nothing fits, and can be promoted by hand.
Speed is measured for dense and every variant. One trained tiny model, three recipes; reruns are cache hits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.batch import compress_batch
from flows.cli import main
from tasks.selection import LATENCY_METRIC
from tests.conftest import batch_mapping

RECIPES = [
    {"name": "w30", "method": "wanda", "sparsity": 0.3},
    {"name": "sg60", "method": "sparsegpt", "sparsity": 0.6},
    {"name": "mag90", "method": "magnitude", "sparsity": 0.9},
]
SPEED = {"prefill_tokens": 32, "decode_tokens": 8, "batch_sizes": [1, 2], "repeats": 1, "warmup": 0}
NAME = "trained-tiny"  # the registered model: the source model's slug


def _config(model: str, selection: dict) -> dict:
    config = batch_mapping([model], RECIPES, name="ship-batch")
    config["evaluation"] |= {"speed": SPEED, "generation_tokens": 0}
    return config | {"selection": selection}


def _increase(result) -> float:
    (label,) = result.perplexity
    return result.perplexity[label] / result.dense_perplexity[label] - 1.0


@pytest.fixture
def client(pipeline_home, tmp_path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_budget_chooses_registers_moves_the_alias_and_says_why_when_nothing_fits(
    prefect_api, client, trained_tiny_dir, capsys
):
    from transformers import AutoModelForCausalLM

    model = str(trained_tiny_dir)
    # A budget everything meets: the sparsest variant ships.
    results = compress_batch(_config(model, {"max_ppl_increase": 10.0}))
    by_name = {r.recipe_name: r for r in results}
    increases = {name: _increase(r) for name, r in by_name.items()}
    assert increases["w30"] < increases["sg60"] < increases["mag90"], increases  # quality falls with sparsity
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == "1" and champion.tags["recipe_name"] == "mag90"
    assert champion.source == by_name["mag90"].model_uri and champion.run_id == by_name["mag90"].mlflow_run_id
    # The version names the artifact's manifest and its hash; the source loads.
    folder = Path(champion.source.removeprefix("file://"))
    manifest = (folder / "MANIFEST.json").read_text()
    assert champion.tags["manifest_uri"] == champion.source + "/MANIFEST.json"
    assert champion.tags["manifest_sha256"] == hashlib.sha256(manifest.encode()).hexdigest()
    assert json.loads(champion.tags["recipe"])["sparsity"] == "0.9"
    assert float(champion.tags["sparsity"]) == pytest.approx(0.9, abs=1e-3)
    AutoModelForCausalLM.from_pretrained(folder)

    # Speed for dense and every variant, next to size and dtype.
    for result in results:
        metrics = client.get_run(result.mlflow_run_id).data.metrics
        for prefix in ("speed.", "dense_speed."):
            for key in ("prefill_tok_s.b1", "prefill_tok_s.b2", "decode_tok_s.b1", "decode_tok_s.b2", LATENCY_METRIC):
                assert metrics[prefix + key] > 0, (result.recipe_name, prefix + key)
        assert client.get_run(result.mlflow_run_id).data.params["dtype"] == "float32"

    # A budget exactly at sg60's perplexity increase: sg60 ships (the limit holds at equality), mag90 does not.
    capsys.readouterr()
    again = compress_batch(_config(model, {"max_ppl_increase": increases["sg60"]}))
    assert {r.task_states["prune"] for r in again} == {"Cached"}
    assert "trained-tiny: sg60 ships as registered model trained-tiny version 2 (champion)" in capsys.readouterr().out
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert (str(champion.version), champion.tags["recipe_name"]) == ("2", "sg60")
    assert champion.source == by_name["sg60"].model_uri
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]  # the earlier version stays

    # Nothing within budget: nothing registered, the alias stays, and the output says why per variant.
    limit = increases["w30"] / 2
    compress_batch(_config(model, {"max_ppl_increase": limit}))
    out = capsys.readouterr().out
    assert "trained-tiny: nothing ships (within budget: none) -- w30: max_ppl_increase" in out
    for name in ("w30", "sg60", "mag90"):
        assert f"{name}: max_ppl_increase wiki: {increases[name]:.4f} > {limit:g} (over by" in out
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 2

    # The report shows the budget and the verdict of the batch's latest run.
    assert main(["report", "ship-batch"]) == 0
    report = capsys.readouterr().out
    assert f"selection: ppl wiki <= dense x {1 + limit:g}; objective sparsity" in report
    assert "ships: trained-tiny: nothing within budget" in report
    assert "decode tok/s b1" in report and "float32" in report

    # By hand: promote w30; the version records who and when.
    assert main(["promote", model, "w30", "--json"]) == 0
    promoted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert promoted["version"] == str(champion.version) == "3" and champion.tags["recipe_name"] == "w30"
    assert champion.tags["promoted_by"] and champion.tags["promoted_at"].startswith("20")
    assert main(["promote", model, "no-such-recipe"]) == 2
    assert "no finished run of recipe 'no-such-recipe'" in capsys.readouterr().err


def test_sparsity_search_bisects_to_the_budget_edge_and_a_rerun_prunes_nothing(
    prefect_api, client, trained_tiny_dir, capsys
):
    model = str(trained_tiny_dir)
    search = {"name": "ws", "method": "wanda", "search": {"low": 0.4, "high": 0.8, "steps": 2}}
    config = batch_mapping([model], [search], name="search-batch") | {"selection": {"max_ppl_increase": 0.05}}
    results = compress_batch(config)
    probes = {float(r.recipe_name.split("@")[1]): r for r in results}
    assert results[0].recipe_name == "ws@0.6" and len(results) == 2
    within = {s: _increase(r) <= 0.05 for s, r in probes.items()}
    best = max(s for s, ok in within.items() if ok)
    resolution = (0.8 - 0.4) / 2**2
    # The search ends where the budget holds and the probe one resolution step above it does not.
    assert within[best] and not within[round(best + resolution, 4)], within
    assert f"trained-tiny x ws: highest sparsity within budget {best:g}" in capsys.readouterr().out
    # Every probe is an ordinary pair: the sparsest one within budget is what ships.
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.tags["recipe_name"] == f"ws@{best:g}"
    parent = client.get_run(client.get_model_version_by_alias(NAME, "champion").run_id).data.tags["mlflow.parentRunId"]
    artifacts = {a.path for a in client.list_artifacts(parent, "plots")}
    assert "plots/search.trained-tiny.ws.max_ppl_increase.wiki.png" in artifacts

    again = compress_batch(config)
    assert [r.recipe_name for r in again] == [r.recipe_name for r in results]
    assert {state for r in again for stage, state in r.task_states.items() if stage != "fetch"} == {"Cached"}
