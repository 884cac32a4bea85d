"""Hostile stores, odd names, torn caches and half-written folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from flows.batch_config import BatchConfig
from infra.artifacts import MANIFEST, FilesystemStore
from infra.durable import read_json, write_atomic
from infra.hashing import folder_manifest, sha256_file
from infra.s3 import S3Store
from infra.safe_paths import UnsafeKey, checked_key, path_inside
from pruning_core.report import REPORT_FILE, PruneReport
from tasks.fetch import SLUG_LENGTH, _HashCache, slug_of
from tasks.prune import commit_folder, finished_report, staging_folder
from tests.conftest import WIKITEXT_VALID, batch_mapping

HOSTILE_KEYS = ["../evil", "a/../../evil", "/etc/evil", "a\\..\\evil", "a//b", "./a", "a/", "", "C:/evil", "a/\x00b"]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_hostile_keys_are_refused_naming_the_key(key):
    with pytest.raises(UnsafeKey, match="refused store key") as refused:
        checked_key(key)
    assert repr(key) in str(refused.value) and "\n" not in str(refused.value)


def test_plain_keys_pass():
    assert checked_key("sub/config.json") == "sub/config.json"
    assert checked_key("a..b/c.d") == "a..b/c.d"


def _hostile_manifest_store(tmp_path: Path, key: str) -> FilesystemStore:
    store = FilesystemStore(tmp_path / "store")
    (tmp_path / "store" / "art").mkdir(parents=True)
    (tmp_path / "store" / "art" / "ok.txt").write_text("fine")
    files = {"ok.txt": {"sha256": sha256_file(tmp_path / "store" / "art" / "ok.txt"), "size": 4}}
    files[key] = {"sha256": "0" * 64, "size": 1}
    (tmp_path / "store" / "art" / MANIFEST).write_text(json.dumps({"files": files, "meta": {}}))
    return store


@pytest.mark.parametrize("key", ["../evil", "/tmp/evil", "sub//evil"])
def test_a_manifest_naming_a_path_outside_writes_nothing(tmp_path, key):
    store = _hostile_manifest_store(tmp_path, key)
    with pytest.raises(UnsafeKey):
        store.get_folder("art", tmp_path / "dest")
    assert not (tmp_path / "dest").exists(), "every key is checked before the first file is written"
    assert not (tmp_path / "evil").exists()


def test_a_link_in_the_store_is_not_followed(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for you")
    store = FilesystemStore(tmp_path / "store")
    (tmp_path / "store" / "art").mkdir(parents=True)
    (tmp_path / "store" / "art" / "data.txt").symlink_to(secret)
    manifest = {"files": {"data.txt": {"sha256": sha256_file(secret), "size": secret.stat().st_size}}, "meta": {}}
    (tmp_path / "store" / "art" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UnsafeKey, match="symbolic link"):
        store.get_folder("art", tmp_path / "dest")
    assert not (tmp_path / "dest" / "data.txt").exists()


def test_a_link_in_the_destination_is_not_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    with pytest.raises(UnsafeKey, match="symbolic link"):
        path_inside(dest, "sub/config.json")


def test_s3_listing_with_hostile_keys_downloads_nothing(s3_bucket, tmp_path):
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="models/m/config.json", Body=b"{}")
    client.put_object(Bucket=s3_bucket, Key="models/m/../../escaped.txt", Body=b"x")
    client.put_object(Bucket=s3_bucket, Key="models/m/sub/", Body=b"")  # a folder marker is skipped, not refused
    with pytest.raises(UnsafeKey, match=r"escaped\.txt"):
        S3Store(f"s3://{s3_bucket}").download_prefix("models/m", tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and not (tmp_path / "escaped.txt").exists()


def test_s3_folder_markers_are_skipped(s3_bucket, tmp_path):
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="models/m/config.json", Body=b"{}")
    client.put_object(Bucket=s3_bucket, Key="models/m/sub/", Body=b"")
    S3Store(f"s3://{s3_bucket}").download_prefix("models/m", tmp_path / "dest")
    assert folder_manifest(tmp_path / "dest").keys() == {"config.json"}


@pytest.mark.parametrize(
    "spec",
    ["s3://bucket/x/sub/..", "s3://bucket/..", "/models/../..", "hf://org/..", "s3://b/" + "é" * 300, "a\\..\\..", "."],
)
def test_slugs_stay_one_plain_bounded_segment(spec):
    slug = slug_of(spec)
    assert slug not in {"", ".", ".."} and "/" not in slug and len(slug) <= SLUG_LENGTH
    assert set(slug) <= set("abcdefghijklmnopqrstuvwxyz0123456789._-")


def test_long_specs_keep_distinct_slugs():
    assert slug_of("s3://b/" + "m" * 200 + "1") != slug_of("s3://b/" + "m" * 200 + "2")


@pytest.mark.parametrize("field", ["name", "recipe"])
@pytest.mark.parametrize("value", ["..", ".", "a" * 101, "a/b"])
def test_batch_and_recipe_names_that_could_be_paths_are_refused(field, value):
    recipe = {"name": value if field == "recipe" else "r", "method": "magnitude", "sparsity": 0.5}
    mapping = batch_mapping([], [recipe], name=value if field == "name" else "b")
    mapping["models"] = ["s3://bucket/model"]
    with pytest.raises(ValueError):
        BatchConfig.model_validate(mapping)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "batch.yaml"
    path.write_text("name: b\nmodels: [a\nrecipes: []\n")
    with pytest.raises(ValueError, match=r"batch\.yaml: not valid YAML at line \d+"):
        BatchConfig.from_yaml(path)
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        BatchConfig.from_yaml(path)


def test_a_torn_hash_cache_is_rebuilt(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"abc" * 1000)
    cache_path = tmp_path / "file-sha256.json"
    cache_path.write_text('{"half": "writ')
    assert _HashCache(cache_path).sha256(weights) == sha256_file(weights)
    assert len(read_json(cache_path)) == 1, "rewritten whole"


def test_atomic_write_leaves_old_content_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    write_atomic(path, "old")

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"], "no temp file left"


def _committed(tmp_path: Path) -> Path:
    out = tmp_path / "models" / "m" / "run"
    staging = staging_folder(out)
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"w" * 4096)
    (staging / "config.json").write_text("{}")
    commit_folder(
        staging, out, PruneReport(total=0.5, parameters=8, recipe={}, recipe_fingerprint="r", prune_seconds=1.0)
    )
    return out


def test_a_committed_folder_is_trusted_only_while_its_files_match(tmp_path):
    out = _committed(tmp_path)
    report = finished_report(out)
    assert report.total == 0.5 and report.files == {"config.json": 2, "model.safetensors": 4096}
    with open(out / "model.safetensors", "r+b") as handle:
        handle.truncate(100)
    assert finished_report(out) is None, "a truncated weight file is not a finished model"
    (out / REPORT_FILE).write_text('{"total": 0.5')
    assert finished_report(out) is None, "a torn report is not a finished model"
    (out / REPORT_FILE).write_text('{"total": 0.5, "surprise": 1}')
    assert finished_report(out) is None, "a report of another layout is not trusted"


def test_staging_folders_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "models" / "m" / "run"
    out.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out.with_name(f".{out.name}.tmp-{dead.stdout.strip()}")
    stale.mkdir()
    alive = out.with_name(f".{out.name}.tmp-1")  # pid 1 is always alive: another process's work in progress
    alive.mkdir()
    staging_folder(out)
    assert not stale.exists() and alive.exists()


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from infra.locks import exclusive
with exclusive(Path(sys.argv[1]), "prune-abc"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_one_process_holds_a_unit_and_a_dead_holders_lock_is_taken_over(tmp_path):
    import select

    root = Path(__file__).resolve().parents[1]

    def start() -> subprocess.Popen:
        command = [sys.executable, "-c", LOCK_HOLDER, str(tmp_path)]
        return subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    holder = start()
    waiter = None
    try:
        assert holder.stdout.readline().strip() == b"held"
        assert f"pid {holder.pid}" in (tmp_path / "prune-abc.lock").read_text()
        waiter = start()
        ready, _, _ = select.select([waiter.stdout], [], [], 3.0)
        assert not ready, "the second process waits while the first holds the lock"
        holder.kill()  # kill -9: no cleanup runs, the kernel drops the lock
        ready, _, _ = select.select([waiter.stdout], [], [], 10.0)
        assert ready and waiter.stdout.readline().strip() == b"held"
        assert f"pid {waiter.pid}" in (tmp_path / "prune-abc.lock").read_text()
    finally:
        for process in (holder, waiter):
            if process is not None:
                process.kill()
                process.wait()


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SECRET = "pl4nted-s3cret"


def test_unreachable_mlflow_fails_the_preflight_fast_without_its_password(tmp_path, monkeypatch):
    import time

    from infra.preflight import ServiceUnavailable, check_services
    from infra.settings import Settings

    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SECATEUR_ARTIFACTS", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://admin:{SECRET}@127.0.0.1:{_closed_port()}")
    settings = Settings()
    for name, value in {"TIMEOUT": settings.service_timeout_seconds, "MAX_RETRIES": settings.service_retries}.items():
        monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{name}", str(value))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as failure:
        check_services(settings)
    assert time.monotonic() - started < 60
    message = str(failure.value)
    assert message.startswith("MLflow at http://admin:***@127.0.0.1") and SECRET not in message
    assert "\n" not in message


def test_a_missing_bucket_is_a_permanent_error_named_in_the_preflight(s3_bucket, tmp_path, monkeypatch):
    from infra.artifacts import PermanentStoreError, open_store
    from infra.preflight import ServiceUnavailable, check_services
    from infra.settings import Settings

    with pytest.raises(PermanentStoreError, match=r"NoSuchBucket|404"):
        open_store("s3://no-such-bucket-here/x").check()
    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SECATEUR_ARTIFACTS", "s3://no-such-bucket-here/models")
    with pytest.raises(ServiceUnavailable, match="artifact store s3://no-such-bucket-here/models"):
        check_services(Settings())
    open_store(f"s3://{s3_bucket}/models").check()  # an existing bucket passes


def test_log_records_and_mlflow_values_are_redacted(caplog):
    import logging

    from infra.redact import install_log_redaction
    from infra.tracking import flatten_params

    install_log_redaction()
    logger = logging.getLogger("secateur.test")
    with caplog.at_level(logging.INFO):
        logger.info("connecting to %s", f"https://bot:{SECRET}@mlflow.example.com")
        try:
            raise ConnectionError(f"refused: postgresql://u:{SECRET}@db/x")
        except ConnectionError:
            logger.exception("failed")
    text = caplog.text + "".join(r.exc_text or "" for r in caplog.records)
    assert SECRET not in text and "https://bot:***@mlflow.example.com" in text
    assert flatten_params({"a": {"b": 1}}) == {"a.b": "1"}


def test_a_batch_file_with_credentials_is_refused_without_echoing_them(tmp_path):
    mapping = batch_mapping([f"s3://user:{SECRET}@bucket/model"], [{"name": "r", "method": "magnitude"}])
    with pytest.raises(ValueError) as refused:
        BatchConfig.model_validate(mapping)
    from pruning_core.recipe import describe_validation_error

    line = describe_validation_error(refused.value, "batch file")
    assert "credentials" in line and SECRET not in line


def test_stack_passes_the_tracking_uri_through_the_environment_not_argv(tmp_path, monkeypatch):
    from infra.settings import Settings
    from infra.stack import _command, services

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"postgresql://u:{SECRET}@db/x")
    settings = Settings()
    for service in services(settings).values():
        assert SECRET not in " ".join(_command(service, settings))


@pytest.mark.slow
def test_batch_with_mlflow_down_fails_fast_and_the_secret_is_nowhere(tmp_path, tiny_model_dir):
    """A real `secateur run` (temporary Prefect server) against an MLflow URI with a password that answers nothing."""
    import time

    import yaml

    root = Path(__file__).resolve().parents[1]
    batch = tmp_path / "batch.yaml"
    mapping = batch_mapping([str(tiny_model_dir)], [{"name": "mag50", "method": "magnitude", "sparsity": 0.5}])
    batch.write_text(yaml.safe_dump(mapping))
    home = tmp_path / "home"
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "SECATEUR_HOME": str(home),
        "SECATEUR_ARTIFACTS": str(tmp_path / "store"),
        "MLFLOW_TRACKING_URI": f"http://admin:{SECRET}@127.0.0.1:{_closed_port()}",
    }
    for name in [k for k in env if k.startswith(("PREFECT_", "MLFLOW_HTTP_"))]:
        env.pop(name)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(batch)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert elapsed < 90, f"{elapsed:.0f} s (temporary Prefect server start included)"
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("secateur: error: ") and "MLflow at http://admin:***@127.0.0.1" in last, done.stderr
    assert SECRET not in done.stdout + done.stderr
    leaks = [p for p in home.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, f"the secret was written to {leaks}"
    assert not (home / "models").exists(), "nothing was pruned"


def test_unreadable_data_files_are_named(tmp_path):
    from pruning_core.data import DataSpecError, read_rows

    binary = tmp_path / "data.txt"
    binary.write_bytes(b"fine line\n\xff\xfe\x00 not text\n")
    with pytest.raises(DataSpecError, match=r"data\.txt: not UTF-8 text"):
        read_rows(str(binary))
    broken = tmp_path / "rows.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataSpecError, match=r"rows\.jsonl:2: not a JSON object"):
        read_rows(f"jsonl:{broken}:text")
    listed = tmp_path / "list.jsonl"
    listed.write_text('["text"]\n')
    with pytest.raises(DataSpecError, match=r"list\.jsonl:1: no field 'text'"):
        read_rows(f"jsonl:{listed}:text")


def test_windows_longer_than_the_model_positions_are_refused():
    import torch

    from pruning_core.engine import prune_model
    from pruning_core.perplexity import perplexity
    from pruning_core.recipe import Recipe
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    model.config.max_position_embeddings = 16
    ids = torch.randint(0, 256, (2, 32))
    with pytest.raises(ValueError, match="calibration seq_len 32 exceeds the model's maximum of 16 positions"):
        prune_model(model, ids, Recipe(method="magnitude", sparsity=0.5), progress=False)
    with pytest.raises(ValueError, match="wiki: seq_len 32 exceeds"):
        perplexity(model, ids.flatten(), 32, label="wiki", progress=False)


@pytest.mark.parametrize("option", ["--seq-len", "--max-tokens", "--limit"])
def test_evaluate_ranges_are_checked_before_loading(option, tiny_model_dir, capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as exit_code:
        main(["evaluate", str(tiny_model_dir), option, "0"])
    assert exit_code.value.code == 2
    assert (
        capsys.readouterr().err
        == f"secateur: error: argument {option}: 0 is not 1 or more (see secateur evaluate --help)\n"
    )


def test_a_window_beyond_the_positions_is_one_line(tiny_model_dir, capsys):
    from flows.cli import main

    assert main(["evaluate", str(tiny_model_dir), "--perplexity", str(WIKITEXT_VALID), "--seq-len", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("secateur: error: ") and "maximum of" in err, err


def test_a_broken_config_is_named(tmp_path, tiny_model_dir):
    import shutil

    from pruning_core.modeling import load_model

    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(Exception, match=r"config\.json") as failure:
        load_model(str(folder))
    assert "\n" not in str(failure.value).strip()


def test_a_truncated_safetensors_file_is_named(tmp_path, tiny_model_dir):
    import shutil

    from pruning_core.modeling import ModelSpecError, load_model

    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ModelSpecError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(str(folder))


def test_runs_of_dead_processes_end_as_killed_and_live_ones_stay(tmp_path, monkeypatch):
    from infra.settings import Settings
    from infra.tracking import PID_TAG, Tracker

    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = Tracker(Settings())
    crashed = tracker.start_run("batch", "crashed")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tracker.client.set_tag(crashed, PID_TAG, dead.stdout.strip())
    running = tracker.start_run("batch", "running")  # this process: alive
    assert tracker.end_abandoned_runs("batch") == [crashed]
    assert tracker.client.get_run(crashed).info.status == "KILLED"
    assert tracker.client.get_run(running).info.status == "RUNNING"
    assert tracker.end_abandoned_runs("no-such-experiment") == []


SERVER_OWNER = """
import sys, time
from pathlib import Path
from flows.local_api import local_prefect_api
with local_prefect_api(Path(sys.argv[1])) as url:
    print(url, flush=True)
    time.sleep(300)
"""


@pytest.mark.slow
def test_the_local_prefect_server_dies_with_its_parent(tmp_path):
    import time

    import httpx

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(root), PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    owner = subprocess.Popen(
        [sys.executable, "-c", SERVER_OWNER, str(tmp_path)], cwd=root, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        url = owner.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        assert httpx.get(f"{url}/api/health", timeout=5).status_code == 200
        owner.kill()  # kill -9: no atexit, no finally
        owner.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/api/health", timeout=1)
            except httpx.HTTPError:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the Prefect server outlived its parent")
    finally:
        owner.kill()


def test_an_unreachable_s3_endpoint_fails_the_preflight_in_seconds(tmp_path, monkeypatch):
    import time

    from infra.preflight import ServiceUnavailable, check_services
    from infra.settings import Settings

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SECATEUR_ARTIFACTS", "s3://nightly/models")
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="artifact store s3://nightly/models unusable") as failure:
        check_services(Settings())
    assert time.monotonic() - started < 60 and SECRET not in str(failure.value)


@pytest.mark.slow
def test_two_batch_runs_on_one_state_dir_prune_and_publish_each_pair_once(tmp_path, tiny_model_dir):
    """Two real `secateur run` processes on one state dir at once, on a machine whose cores are all busy.

    Both succeed (each waits for its own Prefect server to answer), and every unit of work runs once.
    """
    import yaml

    root = Path(__file__).resolve().parents[1]
    recipes = [
        {"name": "mag50", "method": "magnitude", "sparsity": 0.5},
        {"name": "wanda50", "method": "wanda", "sparsity": 0.5},
    ]
    batch = tmp_path / "batch.yaml"
    batch.write_text(yaml.safe_dump(batch_mapping([str(tiny_model_dir)], recipes)))
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(root), "SECATEUR_HOME": str(home), "SECATEUR_ARTIFACTS": str(tmp_path / "s")}
    for name in [k for k in env if k.startswith(("PREFECT_", "MLFLOW_"))]:
        env.pop(name)
    command = [sys.executable, "-m", "flows.cli", "run", str(batch), "--json"]
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])]  # with both runs: cores saturated
    try:
        runs = [
            subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in "ab"
        ]
        outputs = [run.communicate(timeout=400) for run in runs]
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    for run, (_out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err.decode()[-3000:]
    summaries = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
    for summary in summaries:
        assert sorted((r["recipe_name"], r["status"]) for r in summary["results"]) == [
            ("mag50", "completed"),
            ("wanda50", "completed"),
        ]
    uris = [sorted(r["model_uri"] for r in s["results"]) for s in summaries]
    assert uris[0] == uris[1], "both runs point at the same published models"
    logs = "".join(p.read_text() for p in (home / "logs").glob("*.log"))
    assert logs.count("pruning ") == 2, "each pair pruned by one process only"
    models = [p for p in (home / "models").rglob("*") if p.is_dir() and p.name.startswith(".")]
    assert not models, f"staging folders left behind: {models}"
    published = [m.parent for m in (tmp_path / "s").rglob("MANIFEST.json") if not m.parent.name.startswith("report")]
    assert len(published) == 2, published
