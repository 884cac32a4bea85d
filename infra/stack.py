"""`secateur stack up|down|status`: a local Prefect server and MLflow server over the state dir's databases
(SQLite), or with `--postgres` over a PostgreSQL cluster of the state dir (`infra.postgres`), as in production."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from infra import postgres
from infra.locks import process_alive
from infra.settings import Settings

POSTGRES = "postgres"


@dataclass(frozen=True)
class Service:
    name: str
    port: int
    health: str  # path answered with 200 when ready

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def services(settings: Settings) -> dict[str, Service]:
    return {
        "prefect": Service("prefect", settings.prefect_port, "/api/health"),
        "mlflow": Service("mlflow", settings.mlflow_port, "/health"),
    }


def _command(service: Service, settings: Settings) -> list[str]:
    if service.name == "prefect":
        return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(service.port)]
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(service.port),
        "--workers",
        "1",
    ]


def _record_path(settings: Settings, name: str) -> Path:
    return settings.path("stack") / f"{name}.json"


def _healthy(service: Service) -> bool:
    try:
        with urllib.request.urlopen(service.url() + service.health, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _record(settings: Settings, name: str) -> dict | None:
    """What `up` recorded of a service: its pid, url and what else it was started with."""
    path = _record_path(settings, name)
    return json.loads(path.read_text()) if path.is_file() else None


def _write_record(settings: Settings, name: str, **facts) -> None:
    _record_path(settings, name).write_text(json.dumps(facts))


def running(settings: Settings, name: str) -> int | None:
    """The pid of a stack service started by us that is still alive."""
    record = _record(settings, name)
    return record["pid"] if record is not None and process_alive(record["pid"]) else None


WORKERS = "workers"  # `stack up --workers N`: a `secateur worker` process group on the stack's API


def _spawn(settings: Settings, name: str, command: list[str], env: dict[str, str], url: str, **facts) -> None:
    """A service in its own session (so `down` stops its whole group), recorded with its pid."""
    log = open(settings.path("stack") / f"{name}.log", "ab")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=settings.root
    )
    _write_record(settings, name, pid=process.pid, url=url, **facts)


def _database(settings: Settings) -> str | None:
    """What the running stack's servers keep their state in: "postgres" or "sqlite" (None: no server runs)."""
    for name in services(settings):
        if running(settings, name):
            return _record(settings, name).get("database", "sqlite")
    return None


def _server_env(settings: Settings, cluster: postgres.Cluster | None) -> dict[str, str]:
    # Through the environment, not the command line: a database URL may hold a password (`ps`).
    env = {
        **os.environ,
        "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(settings.root / "prefect")),
        "MLFLOW_BACKEND_STORE_URI": settings.tracking_uri,
        "MLFLOW_DEFAULT_ARTIFACT_ROOT": settings.mlflow_artifact_root,
        # The UI asks this API (else Prefect's default port, another server's when one runs there).
        "PREFECT_UI_API_URL": services(settings)["prefect"].url() + "/api",
    }
    if cluster is not None:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = cluster.url("prefect", driver="asyncpg")
        env["MLFLOW_BACKEND_STORE_URI"] = cluster.url("mlflow", driver="psycopg2")
    return env


def _start_postgres(settings: Settings) -> postgres.Cluster:
    """This state dir's cluster, created on first use, running, with the servers' databases."""
    cluster = _cluster(settings)
    if running(settings, POSTGRES) is None:
        if not cluster.initialized():
            cluster.init()
        cluster.start()
        _write_record(settings, POSTGRES, pid=cluster.pid(), url=cluster.url(""))
    cluster.create_databases()
    return cluster


def _cluster(settings: Settings) -> postgres.Cluster:
    return postgres.cluster_for(settings.root, settings.postgres_port)


def client_env(settings: Settings) -> dict[str, str]:
    """What a client of the running stack exports: its Prefect API and where MLflow runs are tracked.

    On PostgreSQL with an s3:// store, the MLflow server, as workers in production do. With a folder store,
    the server's database itself: an MLflow server refuses a model version whose source is a local path outside
    the run's artifacts, which a published folder is. On SQLite, the state dir's file."""
    found = services(settings)
    tracking = settings.tracking_uri
    if _database(settings) == POSTGRES:
        on_s3 = settings.artifact_location.startswith("s3://")
        tracking = found["mlflow"].url() if on_s3 else _cluster(settings).url("mlflow", driver="psycopg2")
    return {"PREFECT_API_URL": found["prefect"].url() + "/api", "MLFLOW_TRACKING_URI": tracking}


def up(
    settings: Settings, timeout: float = 180.0, workers: int = 0, pool: str = "local", use_postgres: bool = False
) -> dict:
    """Start whatever is not running (first the PostgreSQL cluster when asked); wait until each answers its health
    check; then `workers` pool slots."""
    database = _database(settings)
    wanted = POSTGRES if use_postgres else "sqlite"
    if database is not None and database != wanted:
        raise RuntimeError(f"the stack runs on {database}: `secateur stack down` first to start it on {wanted}")
    cluster = _start_postgres(settings) if use_postgres else None
    started: dict[str, Service] = {}
    for service in services(settings).values():
        if running(settings, service.name):
            continue
        env = _server_env(settings, cluster)
        _spawn(settings, service.name, _command(service, settings), env, service.url(), database=wanted)
        started[service.name] = service
    deadline = time.monotonic() + timeout
    for service in started.values():
        while not _healthy(service):
            if time.monotonic() > deadline or not running(settings, service.name):
                down(settings)
                log_path = settings.path("stack") / f"{service.name}.log"
                raise RuntimeError(f"{service.name} did not start on {service.url()}; see {log_path}")
            time.sleep(1)
    urls: dict = {name: service.url() for name, service in services(settings).items()}
    if cluster is not None:
        urls[POSTGRES] = cluster.url("")
    urls["env"] = client_env(settings)
    if workers and not running(settings, WORKERS):
        command = [sys.executable, "-m", "flows.cli", "worker", "--pool", pool, "--slots", str(workers)]
        _spawn(settings, WORKERS, command, {**os.environ, **urls["env"]}, f"pool {pool}, {workers} slot(s)")
    if running(settings, WORKERS):
        urls[WORKERS] = _record(settings, WORKERS)["url"]
    return urls


def down(settings: Settings, grace: float = 20.0, purge: bool = False) -> list[str]:
    """Stop every service we started (workers first), with its whole process group; returns the names stopped.
    `purge`: the PostgreSQL cluster's data goes too."""
    stopped = []
    for name in [WORKERS, *services(settings)]:
        pid = running(settings, name)
        if pid is not None:
            _stop_group(pid, grace)
            stopped.append(name)
        _record_path(settings, name).unlink(missing_ok=True)
    if _record(settings, POSTGRES) is not None:  # last: the servers on it are gone
        cluster = _cluster(settings)
        if running(settings, POSTGRES):
            cluster.stop()
            stopped.append(POSTGRES)
        if purge:
            cluster.remove()
        _record_path(settings, POSTGRES).unlink(missing_ok=True)
    return stopped


def _stop_group(pid: int, grace: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        _reap(pid)
        time.sleep(0.2)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(pid)


def _reap(pid: int) -> None:
    """Collect the exit status when the service is our own child (same process started it)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def status(settings: Settings) -> dict[str, dict]:
    report = {}
    for name, service in services(settings).items():
        pid = running(settings, name)
        report[name] = {
            "url": service.url(),
            "pid": pid,
            "running": pid is not None,
            "healthy": pid is not None and _healthy(service),
        }
    # PostgreSQL and workers have no health URL: alive is healthy; PostgreSQL is listed while recorded.
    for name in (POSTGRES, WORKERS):
        record, pid = _record(settings, name), running(settings, name)
        if record is not None and (pid is not None or name == POSTGRES):
            report[name] = {"url": record["url"], "pid": pid, "running": pid is not None, "healthy": pid is not None}
    return report
