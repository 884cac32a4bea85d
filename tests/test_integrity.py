"""Reuse only what was made, publish only what was measured: sha256 at creation, verified at reuse and upload."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from flows.batch import compress_batch
from infra.artifacts import FilesystemStore
from infra.integrity import file_intact, mismatch, seal, stamp_path
from infra.settings import Settings, state_paths_under
from pruning_core.report import REPORT_FILE, PruneReport
from tasks.prune import commit_folder, finished_report, report_digest
from tasks.publish import PairRecord, UnverifiedModel, publish_pair
from tests.conftest import batch_mapping, save_tiny

RECIPE = [{"name": "mag50", "method": "magnitude", "sparsity": 0.5}]


def _flip_byte(path: Path, offset: int = -100) -> None:
    """Change one byte in place (same size): what a bad disk or a careless hand does."""
    with open(path, "r+b") as handle:
        handle.seek(offset, 2)
        byte = handle.read(1)
        handle.seek(offset, 2)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_stamps_verify_cheaply_while_unchanged_and_fully_otherwise(tmp_path):
    folder = tmp_path / "made"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"a" * 1000)
    digests = seal(folder, ["a.bin"])
    assert stamp_path(folder).is_file() and mismatch(folder, digests) is None
    _flip_byte(folder / "a.bin")
    assert "does not match the sha256" in mismatch(folder, digests)
    (folder / "a.bin").write_bytes(b"a" * 1000)  # the same bytes again (a new mtime): verified by hashing
    assert mismatch(folder, digests) is None
    (folder / "a.bin").unlink()
    assert "missing" in mismatch(folder, digests)

    single = tmp_path / "set.bin"
    single.write_bytes(b"x" * 64)
    assert not file_intact(single), "never sealed: not trusted"
    seal(single, [""])
    assert file_intact(single)
    with open(single, "r+b") as handle:
        handle.truncate(10)
    assert not file_intact(single)


def test_a_committed_folder_records_every_sha256_and_its_report_pins_them(tmp_path):
    staging, out = tmp_path / ".m.tmp", tmp_path / "m"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"w" * 4096)
    (staging / "config.json").write_text("{}")
    report = commit_folder(
        staging, out, PruneReport(total=0.5, parameters=8, recipe={}, recipe_fingerprint="r", prune_seconds=1.0)
    )
    assert report.sha256["model.safetensors"] == hashlib.sha256(b"w" * 4096).hexdigest()
    content = report_digest(out)
    assert finished_report(out, content) is not None
    _flip_byte(out / "model.safetensors")  # same size: only the sha256 tells
    assert finished_report(out, content) is None
    shutil.rmtree(out)
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"v" * 4096)
    (staging / "config.json").write_text("{}")
    commit_folder(
        staging, out, PruneReport(total=0.5, parameters=8, recipe={}, recipe_fingerprint="r", prune_seconds=1)
    )
    assert finished_report(out) is not None and finished_report(out, content) is None, "another content"


def _tags(tmp_path: Path, experiment: str) -> list[dict]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [r.data.tags for r in runs if "model_uri" in r.data.tags]  # the pairs' runs


def _store_manifest(uri: str) -> str:
    return (Path(uri.removeprefix("file://")) / "MANIFEST.json").read_text()


def _published_once(tmp_path: Path, tiny_tokenizer, name: str):
    """A tiny model x magnitude 50% batched once: its config and its one result."""
    config = batch_mapping([str(save_tiny(tmp_path / "tiny", tiny_tokenizer))], RECIPE, name=name)
    (first,) = compress_batch(config)
    return config, first


@pytest.mark.long
def test_an_altered_cached_model_is_made_again_and_never_published(
    prefect_api, pipeline_home, tmp_path, tiny_tokenizer
):
    config, first = _published_once(tmp_path, tiny_tokenizer, "altered")
    (weights,) = (pipeline_home / "models").rglob("model.safetensors")
    good = hashlib.sha256(weights.read_bytes()).hexdigest()
    _flip_byte(weights)  # same size: only the sha256 tells (truncation: see the stamp test)
    (calibration,) = (pipeline_home / "calibration").glob("*.safetensors")
    _flip_byte(calibration, -1)

    (second,) = compress_batch(config)
    assert second.status == "completed"
    assert second.task_states["prune"] == "Completed" and second.task_states["calibrate"] == "Completed"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == good, "made again, to the same bytes"
    assert second.perplexity == first.perplexity
    # Its report (timings) is new, so the folder is other content: a key of its own, the first one untouched.
    assert second.model_uri.startswith(first.model_uri + "-")
    for uri in (first.model_uri, second.model_uri):
        stored = Path(uri.removeprefix("file://"))
        assert hashlib.sha256((stored / "model.safetensors").read_bytes()).hexdigest() == good
    by_run = {t["model_uri"]: t["manifest_sha256"] for t in _tags(tmp_path, config["name"])}
    assert by_run.keys() == {first.model_uri, second.model_uri}
    for uri, sha in by_run.items():
        assert sha == hashlib.sha256(_store_manifest(uri).encode()).hexdigest()


def _published_record(uri: str) -> PairRecord:
    report = Path(uri.removeprefix("file://")).parent / "report" / "report.json"
    with state_paths_under(Settings()):  # its `$SECATEUR_HOME/...` paths, read under this state dir
        return PairRecord.model_validate_json(report.read_text())


@pytest.mark.long
def test_other_bytes_for_a_published_key_go_under_their_content_key(
    prefect_api, pipeline_home, tmp_path, tiny_tokenizer
):
    """Two machines making one pair with different numerics: each MLflow run points at its own bytes."""
    config, first = _published_once(tmp_path, tiny_tokenizer, "two-publishers")
    record = _published_record(first.model_uri)
    settings = Settings()
    # The same pair made elsewhere with other bytes: a committed folder of its own (as another machine has).
    other = tmp_path / "elsewhere" / "model"
    staging = tmp_path / "elsewhere" / ".model.tmp"
    shutil.copytree(record.pruned.path, staging)
    (staging / REPORT_FILE).unlink()
    tensors = load_file(staging / "model.safetensors")
    name = next(k for k in tensors if k.endswith("down_proj.weight"))
    tensors[name] = tensors[name] * 1.001
    save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
    made = commit_folder(staging, other, PruneReport.read(record.pruned.path))
    assert made.sha256["model.safetensors"] != PruneReport.read(record.pruned.path).sha256["model.safetensors"]
    moved = record.pruned.model_copy(update={"path": str(other), "content": report_digest(other)})
    second = publish_pair(record.model_copy(update={"pruned": moved}), settings, None, config["name"])

    assert second.model_uri.startswith(first.model_uri + "-") and second.model_uri != first.model_uri
    store = FilesystemStore(settings.artifact_location)
    key = first.model_uri.removeprefix(store.uri + "/")
    assert store.read_manifest(key)["files"]["model.safetensors"]["sha256"] == (
        hashlib.sha256(Path(record.pruned.path, "model.safetensors").read_bytes()).hexdigest()
    ), "the first publication's bytes are untouched"
    by_run = {t["model_uri"]: t["manifest_sha256"] for t in _tags(tmp_path, config["name"])}
    for uri in (first.model_uri, second.model_uri):
        assert by_run[uri] == hashlib.sha256(_store_manifest(uri).encode()).hexdigest()
    stored = Path(second.model_uri.removeprefix("file://")) / "model.safetensors"
    assert stored.read_bytes() == (other / "model.safetensors").read_bytes()

    again = publish_pair(record.model_copy(update={"pruned": moved}), settings, None, config["name"])
    assert again.model_uri == second.model_uri, "the same content again: the same key, nothing rewritten"

    # A folder altered after it was evaluated is refused before anything is sent.
    _flip_byte(other / "model.safetensors")
    before = sorted(p for p in Path(settings.artifact_location).rglob("*") if p.is_file())
    with pytest.raises(UnverifiedModel, match="not the bytes that were made and evaluated"):
        publish_pair(record.model_copy(update={"pruned": moved}), settings, None, config["name"])
    after = sorted(p for p in Path(settings.artifact_location).rglob("*") if p.is_file())
    assert before == after, "nothing uploaded"
    json.loads(_store_manifest(second.model_uri))  # still the committed manifest


@pytest.mark.parametrize("text", ['{"files": {"a": {"sha256": "x"', '["files"]', '{"files": {"a": {"size": "9"}}}'])
def test_a_malformed_manifest_is_one_error_naming_it(tmp_path, text):
    from infra.artifacts import ArtifactStoreError

    (tmp_path / "store" / "art").mkdir(parents=True)
    (tmp_path / "store" / "art" / "MANIFEST.json").write_text(text)
    with pytest.raises(ArtifactStoreError, match=r"store/art/MANIFEST\.json: not") as failure:
        FilesystemStore(tmp_path / "store").get_folder("art", tmp_path / "out")
    assert "\n" not in str(failure.value) and not (tmp_path / "out").exists()
