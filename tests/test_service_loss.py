"""Services lost or hung: every batch ends in a stated time with one line, keeps its work, leaks no secret."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from flows.batch import PairsFailed, compress_batch
from infra.preflight import ServiceUnavailable, check_services
from infra.settings import Settings
from infra.watchdog import watched
from tests.conftest import batch_mapping, save_tiny
from tests.services import (
    HangingProxy,
    SilentServer,
    kill_group,
    start_mlflow_server,
    start_prefect_server,
    wait_for_log,
)

SECRET = "pl4nted-s3cret"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


def test_a_hung_s3_endpoint_fails_the_preflight_within_timeout_x_attempts(silent, tmp_path, monkeypatch):
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{silent.port}",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "SECATEUR_HOME": str(tmp_path / "home"),
        "SECATEUR_ARTIFACTS": "s3://bucket/models",
        "SECATEUR_SERVICE_TIMEOUT_SECONDS": "1",
        "SECATEUR_UPLOAD_ATTEMPTS": "2",
    }.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="artifact store s3://bucket/models unusable") as failure:
        check_services(Settings())
    elapsed = time.monotonic() - started
    assert elapsed < 1 * 2 + 4, f"{elapsed:.1f} s for 2 attempts of 1 s (plus backoff)"
    assert SECRET not in str(failure.value) and "\n" not in str(failure.value)


def test_a_hung_mlflow_endpoint_fails_the_preflight_within_timeout_x_retries(silent, tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SECATEUR_ARTIFACTS", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://admin:{SECRET}@127.0.0.1:{silent.port}")
    for name, value in {"TIMEOUT": "1", "MAX_RETRIES": "1", "BACKOFF_FACTOR": "0"}.items():
        monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{name}", value)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as failure:
        check_services(Settings())
    elapsed = time.monotonic() - started
    assert elapsed < 1 * 2 + 6, f"{elapsed:.1f} s for 2 requests of 1 s"
    message = str(failure.value)
    assert message.startswith("MLflow at http://admin:***@127.0.0.1") and SECRET not in message


def test_the_watchdog_names_a_service_that_stops_answering_in_bounded_time():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    lost: list[tuple[float, str]] = []
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    with watched("the test API", url, 1, 3, lambda line: lost.append((time.monotonic(), line))):
        time.sleep(3)
        assert not lost, "an answering service is not lost"
        server.shutdown()
        server.server_close()
        stopped = time.monotonic()
        while not lost and time.monotonic() - stopped < 15:
            time.sleep(0.1)
    assert len(lost) == 1 and lost[0][0] - stopped < 3 + 2 + 1 + 1
    assert lost[0][1].startswith(f"the test API at {url} stopped answering")


@pytest.mark.long
def test_s3_hanging_mid_upload_fails_the_pair_cleanly_and_a_rerun_publishes(
    prefect_api, pipeline_home, tmp_path, tiny_tokenizer, s3_server, s3_bucket, monkeypatch
):
    endpoint = urlsplit(s3_server)
    proxy = HangingProxy((endpoint.hostname, endpoint.port))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("SECATEUR_ARTIFACTS", f"s3://{s3_bucket}/models")
    for key, value in {"SERVICE_TIMEOUT_SECONDS": "1", "UPLOAD_ATTEMPTS": "2", "TASK_RETRIES": "1"}.items():
        monkeypatch.setenv(f"SECATEUR_{key}", value)
    monkeypatch.setenv("SECATEUR_RETRY_DELAY_SECONDS", "0")
    model = str(save_tiny(tmp_path / "tiny", tiny_tokenizer))
    config = batch_mapping([model], [{"name": "mag50", "method": "magnitude", "sparsity": 0.5}], name="hung-s3")
    # The bucket answers the preflight, MLflow and the run records; the model's upload hangs.
    proxy.hang_prefix = f"PUT /{s3_bucket}/models/tiny/".encode()
    started = time.monotonic()
    with pytest.raises(PairsFailed, match=r"1 of 1 pairs failed: tiny x mag50: S3 upload failed") as failure:
        compress_batch(config)
    elapsed = time.monotonic() - started
    assert proxy.hung >= 2, "the hung upload was retried"
    assert elapsed < 60, f"{elapsed:.0f} s: each attempt gives up after the service timeout"
    assert "\n" not in str(failure.value)
    assert list((pipeline_home / "models").rglob("model.safetensors")), "the pruned model is kept"
    proxy.hang_prefix = None
    (result,) = compress_batch(config)
    assert result.status == "completed" and result.task_states["prune"] == "Cached"
    assert result.model_uri.startswith(f"s3://{s3_bucket}/models/tiny/")
    proxy.close()
    print(f"hung upload: the pair failed after {elapsed:.0f} s")


def _environment(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SECATEUR_", "MLFLOW_"))}
    return {**env, "PYTHONPATH": str(ROOT), "SECATEUR_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


def _batch_file(tmp_path: Path, tiny_tokenizer, recipes: list[dict], name: str) -> Path:
    model = str(save_tiny(tmp_path / "tiny", tiny_tokenizer))
    batch = tmp_path / f"{name}.yaml"
    batch.write_text(yaml.safe_dump(batch_mapping([model], recipes, name=name)))
    return batch


def _secateur(batch: Path, env: dict[str, str], *argv: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "flows.cli", "run", str(batch), *argv]
    return subprocess.Popen(
        command, env=env, cwd=batch.parent, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


@pytest.mark.long
def test_a_killed_prefect_server_fails_the_batch_in_bounded_time_and_a_rerun_finishes(tmp_path, tiny_tokenizer):
    recipes = [{"name": "sgpt50", "method": "sparsegpt", "sparsity": 0.5}]
    batch = _batch_file(tmp_path, tiny_tokenizer, recipes, "lost-prefect")
    home = tmp_path / "home"
    server, api = start_prefect_server(tmp_path / "prefect")
    env = _environment(
        home,
        PREFECT_API_URL=api,
        SECATEUR_ARTIFACTS=str(tmp_path / "store"),
        SECATEUR_SERVICE_TIMEOUT_SECONDS="2",
        SECATEUR_SERVICE_RETRIES="1",
    )
    run = _secateur(batch, env)
    try:
        assert wait_for_log(run, "stage prune started", timeout=300), "the batch reached its prune"
        kill_group(server)
        killed = time.monotonic()
        _, stderr = run.communicate(timeout=120)
        elapsed = time.monotonic() - killed
    finally:
        run.kill()
        kill_group(server)
    assert run.returncode != 0
    # Stated bound: timeout x (retries + 1) = 4 s of silence, plus a health check (2 s) and its timeout (2 s).
    assert elapsed < 4 + 2 + 2 + 5, f"{elapsed:.1f} s"
    assert stderr.strip().splitlines()[-1].startswith("secateur: error: the Prefect API at http://127.0.0.1:")
    server, api = start_prefect_server(tmp_path / "prefect")
    try:
        rerun = _secateur(batch, env | {"PREFECT_API_URL": api}, "--json")
        out, err = rerun.communicate(timeout=600)
    finally:
        kill_group(server)
    assert rerun.returncode == 0, err[-3000:]
    (result,) = json.loads(out.strip().splitlines()[-1])["results"]
    assert result["status"] == "completed"


@pytest.mark.long
def test_mlflow_with_a_password_succeeds_then_dies_mid_batch_and_no_secret_is_anywhere(tmp_path, tiny_tokenizer):
    """A real MLflow server reached with a password in its URI: a clean batch, then one whose MLflow is killed
    after its first pair. Every output and every file of the state dir (SQLite and WAL included) is grepped."""
    recipes = [
        {"name": "mag50", "method": "magnitude", "sparsity": 0.5},
        {"name": "sgpt50", "method": "sparsegpt", "sparsity": 0.5},
    ]
    batch = _batch_file(tmp_path, tiny_tokenizer, recipes, "mlflow-dies")
    home = tmp_path / "home"
    server, url = start_mlflow_server(tmp_path / "mlflow")
    env = _environment(
        home,
        MLFLOW_TRACKING_URI=url.replace("http://", f"http://admin:{SECRET}@"),
        SECATEUR_ARTIFACTS=str(tmp_path / "store"),
        SECATEUR_SERVICE_TIMEOUT_SECONDS="2",
        SECATEUR_SERVICE_RETRIES="0",
        SECATEUR_TASK_RETRIES="0",
    )
    outputs = []
    try:
        clean = _secateur(batch, env, "--json")
        out, err = clean.communicate(timeout=600)
        outputs.append(out + err)
        assert clean.returncode == 0, err[-3000:]
        assert "View run" in out and "admin:" not in out, "MLflow's run link, without the credentials"

        second = yaml.safe_load(batch.read_text()) | {"name": "mlflow-dies-2"}
        second["recipes"] = [{**r, "sparsity": 0.6} for r in recipes]  # new pairs: each is pruned and published
        batch.with_name("second.yaml").write_text(yaml.safe_dump(second))
        dies = _secateur(batch.with_name("second.yaml"), env, "--json")
        assert wait_for_log(dies, "stage prune started", timeout=300)
        kill_group(server)
        out, err = dies.communicate(timeout=600)
        outputs.append(out + err)
    finally:
        kill_group(server)
    assert dies.returncode != 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert sorted(r["recipe_name"] for r in summary["results"]) == ["mag50", "sgpt50"], "every pair accounted for"
    assert all(r["status"] == "failed" and "mlflow" in (r["error"] or "").lower() for r in summary["results"]), summary
    assert err.strip().splitlines()[-1].startswith("secateur: error: 2 of 2 pairs failed")
    text = "".join(outputs)
    assert SECRET not in text
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.name.endswith(("-wal", ".db")) for p in files), "the Prefect database was searched"
    leaks = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaks, f"the secret was written to {leaks}"
