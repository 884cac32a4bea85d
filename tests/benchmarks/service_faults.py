"""Service faults for `bench_faults --services`: real servers killed, restarted and hung under tiny batches."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import boto3

from tests.benchmarks.bench_faults import tiny_batch
from tests.benchmarks.common import ROOT, write_results
from tests.services import (
    SilentServer,
    free_port,
    kill_group,
    start_mlflow_server,
    start_prefect_server,
    wait_for_log,
    wait_healthy,
)

SECRET = "pl4nted-s3cret"
TIMEOUT, RETRIES, ATTEMPTS = 2, 1, 2  # SECATEUR_SERVICE_TIMEOUT_SECONDS, _SERVICE_RETRIES, _UPLOAD_ATTEMPTS
STARTUP = 30.0  # a CLI process importing torch, transformers, Prefect and MLflow on 2 busy cores
BUCKET = "faults"


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SECATEUR_", "MLFLOW_", "AWS_"))}
    settings = {
        "SECATEUR_SERVICE_TIMEOUT_SECONDS": str(TIMEOUT),
        "SECATEUR_SERVICE_RETRIES": str(RETRIES),
        "SECATEUR_UPLOAD_ATTEMPTS": str(ATTEMPTS),
        "SECATEUR_TASK_RETRIES": "0",
    }
    return {**env, "PYTHONPATH": str(ROOT), "SECATEUR_HOME": str(home), "PYTHONUNBUFFERED": "1", **settings, **extra}


def _run(batch: Path, env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "flows.cli", "run", str(batch)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    return subprocess.Popen(command, env=env, cwd=batch.parent, text=True, **pipes)


def _finish(process: subprocess.Popen, since: float, outputs: list[str]) -> tuple[int, float, str]:
    out, err = process.communicate(timeout=900)
    outputs.append(out + err)
    lines = err.strip().splitlines()
    return process.returncode, time.monotonic() - since, lines[-1] if lines else ""


def _s3_env(port: int) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "faults-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def _start_moto(port: int, folder: Path) -> subprocess.Popen:
    with open(folder / "moto.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_healthy(f"http://127.0.0.1:{port}/moto-api/", process)
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="faults-key",
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    return process


def _object_bytes(uri: str, env: dict[str, str]) -> Callable[[str], bytes | None]:
    """Reader of files under a published folder's URI (file:// or s3://)."""
    if uri.startswith("file://"):
        base = Path(uri.removeprefix("file://"))
        return lambda name: (base / name).read_bytes() if (base / name).is_file() else None
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    return lambda name: client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()


def published_matches(tracking_uri: str, env: dict[str, str]) -> tuple[int, int]:
    """(pair runs with a manifest, those whose stored manifest and every file match their MLflow record)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    checked = matching = 0
    for run in runs:
        tags = run.data.tags
        if "manifest_sha256" not in tags:
            continue
        checked += 1
        read = _object_bytes(tags["model_uri"], env)
        manifest_text = read("MANIFEST.json")
        if manifest_text is None or hashlib.sha256(manifest_text).hexdigest() != tags["manifest_sha256"]:
            continue
        files = json.loads(manifest_text)["files"]
        if all(hashlib.sha256(read(name) or b"").hexdigest() == entry["sha256"] for name, entry in files.items()):
            matching += 1
    return checked, matching


def _secrets(home: Path, outputs: list[str]) -> int:
    in_files = sum(1 for p in home.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes())
    return in_files + sum(SECRET in text for text in outputs)


def _row(fault: str, bound: float, ended: tuple[int, float, str], rerun: int | None, **extra) -> dict:
    code, seconds, line = ended
    return {
        "fault": fault,
        "exit": code,
        "ended_seconds": round(seconds, 1),
        "bound_seconds": bound,
        "within_bound": code != 0 and seconds <= bound,
        "last_line": line[:300],
        "rerun_exit": rerun,
        **extra,
    }


def prefect_killed(batch: Path, folder: Path) -> dict:
    home, outputs = folder / "home", []
    server, api = start_prefect_server(folder / "prefect")
    env = _env(home, PREFECT_API_URL=api, SECATEUR_ARTIFACTS=str(folder / "store"))
    run = _run(batch, env)
    wait_for_log(run, "stage prune started", 600)
    kill_group(server)
    ended = _finish(run, time.monotonic(), outputs)
    server, api = start_prefect_server(folder / "prefect")
    rerun = _finish(_run(batch, env | {"PREFECT_API_URL": api}), time.monotonic(), outputs)
    kill_group(server)
    # Bound: watchdog silence timeout x (retries + 1), one check interval, one health-check timeout, exit.
    bound = TIMEOUT * (RETRIES + 1) + 2 + TIMEOUT + 5
    checked, matching = published_matches(f"sqlite:///{home / 'mlflow.db'}", env)
    return _row("prefect server killed mid-prune", bound, ended, rerun[0], published=checked, matching=matching) | {
        "secrets_found": _secrets(home, outputs)
    }


def s3_killed_restarted(batch: Path, folder: Path) -> dict:
    home, outputs, port = folder / "home", [], free_port()
    moto = _start_moto(port, folder)
    env = _env(home, SECATEUR_ARTIFACTS=f"s3://{BUCKET}/models", **_s3_env(port))
    run = _run(batch, env)
    wait_for_log(run, "stage publish started", 600)
    kill_group(moto)
    ended = _finish(run, time.monotonic(), outputs)
    moto = _start_moto(port, folder)  # a fresh (empty) endpoint on the same address
    rerun = _finish(_run(batch, env), time.monotonic(), outputs)
    checked, matching = published_matches(f"sqlite:///{home / 'mlflow.db'}", env)
    kill_group(moto)
    # Bound: per request, ATTEMPTS refused connections with backoff; a handful of requests (manifest, files,
    # run record, MLflow's review upload), then the batch's own end.
    return _row("S3 killed at publish, restarted", 90.0, ended, rerun[0], published=checked, matching=matching) | {
        "secrets_found": _secrets(home, outputs)
    }


def mlflow_killed(batch: Path, folder: Path) -> dict:
    home, outputs = folder / "home", []
    server, url = start_mlflow_server(folder / "mlflow")
    uri = url.replace("http://", f"http://admin:{SECRET}@")
    env = _env(home, MLFLOW_TRACKING_URI=uri, SECATEUR_ARTIFACTS=str(folder / "store"))
    run = _run(batch, env)
    wait_for_log(run, "stage prune started", 600)
    kill_group(server)
    ended = _finish(run, time.monotonic(), outputs)
    restarted, _ = start_mlflow_server(folder / "mlflow", int(url.rsplit(":", 1)[1]))
    rerun = _finish(_run(batch, env), time.monotonic(), outputs)
    checked, matching = published_matches(url, env)
    kill_group(restarted)
    # Bound: each MLflow call refused at once, MLFLOW_HTTP_REQUEST_MAX_RETRIES = RETRIES with backoff 1 s.
    return _row("MLflow killed mid-prune", 90.0, ended, rerun[0], published=checked, matching=matching) | {
        "secrets_found": _secrets(home, outputs)
    }


def hung_endpoint(batch: Path, folder: Path, service: str) -> dict:
    home, outputs, silent = folder / "home", [], SilentServer()
    if service == "s3":
        extra = {"SECATEUR_ARTIFACTS": f"s3://{BUCKET}/models", **_s3_env(silent.port)}
        bound = TIMEOUT * ATTEMPTS + 5 + STARTUP
    else:
        extra = {
            "SECATEUR_ARTIFACTS": str(folder / "store"),
            "MLFLOW_TRACKING_URI": f"http://admin:{SECRET}@127.0.0.1:{silent.port}",
        }
        bound = TIMEOUT * (RETRIES + 1) + 3 + STARTUP
    started = time.monotonic()
    ended = _finish(_run(batch, _env(home, **extra)), started, outputs)
    silent.close()
    return _row(f"hung {service} endpoint (preflight)", bound, ended, None) | {"secrets_found": _secrets(home, outputs)}


def corrupted_result(batch: Path, folder: Path) -> dict:
    home, outputs = folder / "home", []
    env = _env(home, SECATEUR_ARTIFACTS=str(folder / "store"))
    clean = _finish(_run(batch, env), time.monotonic(), outputs)
    (weights,) = (home / "models").rglob("model.safetensors")
    with open(weights, "r+b") as handle:
        handle.seek(-64, 2)
        handle.write(b"\x00" * 32)
    rerun = _finish(_run(batch, env), time.monotonic(), outputs)
    logs = "".join(p.read_text(errors="replace") for p in (home / "logs").glob("*.log"))
    checked, matching = published_matches(f"sqlite:///{home / 'mlflow.db'}", env)
    return {
        "fault": "pruned weights altered on disk",
        "clean_exit": clean[0],
        "rerun_exit": rerun[0],
        "detected": "does not match the sha256" in logs,
        "within_bound": None,
        "published": checked,
        "matching": matching,
        "secrets_found": _secrets(home, outputs),
    }


def run_service_faults() -> None:
    with tempfile.TemporaryDirectory(prefix="secateur-service-faults-") as scratch:
        folder = Path(scratch)
        _, batch = tiny_batch(folder, [{"name": "sparsegpt50", "method": "sparsegpt", "sparsity": 0.5}])
        scenarios = {
            "prefect": lambda f: prefect_killed(batch, f),
            "s3": lambda f: s3_killed_restarted(batch, f),
            "mlflow": lambda f: mlflow_killed(batch, f),
            "hung-s3": lambda f: hung_endpoint(batch, f, "s3"),
            "hung-mlflow": lambda f: hung_endpoint(batch, f, "mlflow"),
            "corrupted": lambda f: corrupted_result(batch, f),
        }
        rows = []
        for name, scenario in scenarios.items():
            (folder / name).mkdir()
            rows.append(scenario(folder / name))
            print(rows[-1], flush=True)
    bounded = [r for r in rows if r["within_bound"] is not None]
    counts = {
        "faults_injected": len(rows),
        "batches_ended_within_bound": sum(bool(r["within_bound"]) for r in bounded),
        "batches_with_a_bound": len(bounded),
        "reruns_completed": sum(r.get("rerun_exit") == 0 for r in rows),
        "reruns": sum(r.get("rerun_exit") is not None for r in rows),
        "artifacts_published": sum(r.get("published", 0) for r in rows),
        "artifacts_matching_mlflow": sum(r.get("matching", 0) for r in rows),
        "secrets_found": sum(r["secrets_found"] for r in rows),
    }
    print(counts)
    write_results("service-faults", {"counts": counts, "settings": [TIMEOUT, RETRIES, ATTEMPTS]}, rows)
