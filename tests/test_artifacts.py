"""Artifact store against a real local S3 endpoint and the filesystem backend."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from infra.artifacts import MANIFEST, ArtifactStoreError, FilesystemStore, open_store
from infra.hashing import sha256_file
from infra.s3 import S3Store

MiB = 1024 * 1024


@pytest.fixture
def folder(tmp_path):
    source = tmp_path / "artifact"
    (source / "sub").mkdir(parents=True)
    (source / "weights.bin").write_bytes(os.urandom(11 * MiB))
    (source / "sub" / "config.json").write_text('{"a": 1}')
    return source


def _calls(store: S3Store) -> list[str]:
    seen: list[str] = []
    store.client.meta.events.register("before-call.s3.*", lambda model, **_: seen.append(model.name))
    return seen


def _small_parts(store: S3Store) -> S3Store:
    store.transfer = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    return store


def test_s3_upload_is_multipart_verified_and_idempotent(s3_bucket, folder, tmp_path):
    store = _small_parts(open_store(f"s3://{s3_bucket}/team/models"))
    calls = _calls(store)
    manifest = store.put_folder(folder, "m1/model", {"run": "abc"})
    assert "CreateMultipartUpload" in calls and calls.count("UploadPart") == 3
    writes = [c for c in calls if c in {"PutObject", "UploadPart", "CreateMultipartUpload"}]
    assert writes[-1] == "PutObject", "the manifest is written last"
    assert manifest["files"]["weights.bin"]["sha256"] == sha256_file(folder / "weights.bin")
    assert manifest["uri"] == f"s3://{s3_bucket}/team/models/m1/model"
    head = store.client.head_object(Bucket=s3_bucket, Key="team/models/m1/model/weights.bin")
    assert (
        head["ContentLength"] == 11 * MiB and head["Metadata"]["sha256"] == manifest["files"]["weights.bin"]["sha256"]
    )

    calls.clear()
    assert store.put_folder(folder, "m1/model", {"run": "abc"}) == manifest, "the same content again: a no-op"
    assert not {"PutObject", "UploadPart", "CreateMultipartUpload"} & set(calls), calls

    # Other bytes for a committed key: never over the first ones, under the content's own key instead.
    (folder / "sub" / "config.json").write_text('{"a": 2}')
    other = store.put_folder(folder, "m1/model", {"run": "abc"})
    assert other["uri"].startswith(f"s3://{s3_bucket}/team/models/m1/model-") and other["uri"] != manifest["uri"]
    assert store.read_manifest("m1/model") == manifest
    first = store.get_folder("m1/model", tmp_path / "first")
    assert (first / "sub" / "config.json").read_text() != '{"a": 2}'
    key = other["uri"].removeprefix(f"s3://{s3_bucket}/team/models/")
    out = store.get_folder(key, tmp_path / "download")
    assert sha256_file(out / "weights.bin") == sha256_file(folder / "weights.bin")
    assert (out / "sub" / "config.json").read_text() == '{"a": 2}'
    assert store.put_folder(folder, "m1/model", {"run": "abc"}) == other, "and that key is stable"


def test_s3_reader_never_sees_an_artifact_without_its_manifest(s3_bucket, folder, tmp_path):
    store = open_store(f"s3://{s3_bucket}")
    store._put_file(folder / "weights.bin", "half/weights.bin", sha256_file(folder / "weights.bin"), 11 * MiB)
    with pytest.raises(ArtifactStoreError, match=r"no MANIFEST\.json"):
        store.get_folder("half", tmp_path / "out")


def test_s3_download_detects_a_corrupted_object(s3_bucket, folder, tmp_path):
    store = open_store(f"s3://{s3_bucket}")
    store.put_folder(folder, "art")
    store.client.put_object(Bucket=s3_bucket, Key="art/sub/config.json", Body=b'{"a": 666}')
    with pytest.raises(ArtifactStoreError, match="checksum mismatch"):
        store.get_folder("art", tmp_path / "out")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_s3_endpoint_down_is_retried_then_fails_clearly(monkeypatch, folder, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASECRETNEVERSHOWN")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-never-shown")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = open_store("s3://unreachable/prefix", attempts=3)
    sends: list[str] = []
    store.client.meta.events.register("before-send.s3.*", lambda **kw: sends.append(kw.get("event_name")))
    with pytest.raises(ArtifactStoreError) as failure:
        store.put_folder(folder, "model")
    # The first request (the manifest lookup) retried, then given up: nothing else was tried.
    assert len(sends) >= 3 and set(sends) == {"before-send.s3.GetObject"}, sends
    message = str(failure.value)
    assert "127.0.0.1" in message and "\n" not in message
    assert "AKIASECRETNEVERSHOWN" not in message + capsys.readouterr().err
    assert "hunter2" not in message


def test_filesystem_store_is_atomic_and_idempotent(tmp_path, folder):
    store = FilesystemStore(tmp_path / "store")
    store.put_folder(folder, "a/b")
    stored = tmp_path / "store" / "a" / "b"
    assert (stored / MANIFEST).is_file()
    stamp = (stored / "weights.bin").stat().st_mtime_ns
    store.put_folder(folder, "a/b")
    assert (stored / "weights.bin").stat().st_mtime_ns == stamp
    assert not list(stored.rglob(".*")), "no temp files left behind"
    assert store.read_manifest("a/b")["files"].keys() == {"weights.bin", "sub/config.json"}


def test_unknown_store_scheme_is_refused():
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        open_store("gs://bucket/x")


def test_fetch_model_from_an_s3_prefix_matches_the_local_copy(s3_bucket, tmp_path, tiny_model_dir, monkeypatch):
    import boto3

    from infra.settings import Settings
    from tasks.fetch import snapshot_model

    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "home"))
    client = boto3.client("s3")
    for path in tiny_model_dir.iterdir():  # uploaded by another tool: no manifest
        client.upload_file(str(path), s3_bucket, f"models/tiny/{path.name}")
    remote = snapshot_model(f"s3://{s3_bucket}/models/tiny/", Settings())
    local = snapshot_model(str(tiny_model_dir), Settings())
    assert remote.fingerprint == local.fingerprint and remote.files == local.files
    assert remote.slug == "tiny" and Path(remote.path).is_dir()

    from pruning_core.modeling import load_model

    model, _ = load_model(remote.path)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_fetch_model_reports_a_missing_s3_prefix(s3_bucket, tmp_path, monkeypatch):
    from infra.settings import Settings
    from tasks.fetch import snapshot_model

    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "home"))
    with pytest.raises(ArtifactStoreError, match="no objects under this prefix"):
        snapshot_model(f"s3://{s3_bucket}/models/absent/", Settings())


@pytest.mark.parametrize("scheme", ["s3", "folder"])
def test_delete_prefix_removes_one_file_or_a_whole_folder(scheme, s3_bucket, tmp_path):
    """A block's mirrored inputs are one file inside its folder; the whole mirror is a folder."""
    source = tmp_path / "block-000"
    source.mkdir()
    (source / "inputs.safetensors").write_bytes(b"i" * 64)
    (source / "weights.safetensors").write_bytes(b"w" * 64)
    store = open_store(f"s3://{s3_bucket}/ckpt" if scheme == "s3" else str(tmp_path / "store"))
    store.put_folder(source, "run/block-000")
    store.delete_prefix("run/block-000/inputs.safetensors")
    assert store._read_text("run/block-000/inputs.safetensors") is None
    assert store._read_text("run/block-000/weights.safetensors") == "w" * 64
    store.delete_prefix("run")
    assert store._read_text("run/block-000/weights.safetensors") is None
    if scheme == "s3":
        assert store.list_keys("run") == []
