"""`secateur stack up|down|status`: a local Prefect server and MLflow UI over the state dir's databases."""

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

from infra.locks import process_alive
from infra.settings import Settings


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


def running(settings: Settings, name: str) -> int | None:
    """The pid of a stack service started by us that is still alive."""
    path = _record_path(settings, name)
    if not path.is_file():
        return None
    pid = json.loads(path.read_text())["pid"]
    return pid if process_alive(pid) else None


WORKERS = "workers"  # `stack up --workers N`: a `secateur worker` process group on the stack's API


def _spawn(settings: Settings, name: str, command: list[str], env: dict[str, str], url: str) -> None:
    """A service in its own session (so `down` stops its whole group), recorded with its pid."""
    log = open(settings.path("stack") / f"{name}.log", "ab")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=settings.root
    )
    (settings.path("stack") / f"{name}.json").write_text(json.dumps({"pid": process.pid, "url": url}))


def up(settings: Settings, timeout: float = 180.0, workers: int = 0, pool: str = "local") -> dict[str, str]:
    """Start whatever is not running; wait until each answers its health check; then `workers` pool slots."""
    started: dict[str, Service] = {}
    for service in services(settings).values():
        if running(settings, service.name):
            continue
        env = {
            **os.environ,
            "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(settings.root / "prefect")),
            # Through the environment, not the command line: a database URL may hold a password (`ps`).
            "MLFLOW_BACKEND_STORE_URI": settings.tracking_uri,
            "MLFLOW_DEFAULT_ARTIFACT_ROOT": settings.mlflow_artifact_root,
        }
        _spawn(settings, service.name, _command(service, settings), env, service.url())
        started[service.name] = service
    deadline = time.monotonic() + timeout
    for service in started.values():
        while not _healthy(service):
            if time.monotonic() > deadline or not running(settings, service.name):
                down(settings)
                log_path = settings.path("stack") / f"{service.name}.log"
                raise RuntimeError(f"{service.name} did not start on {service.url()}; see {log_path}")
            time.sleep(1)
    urls = {name: service.url() for name, service in services(settings).items()}
    if workers and not running(settings, WORKERS):
        command = [sys.executable, "-m", "flows.cli", "worker", "--pool", pool, "--slots", str(workers)]
        env = {**os.environ, "PREFECT_API_URL": urls["prefect"] + "/api"}
        _spawn(settings, WORKERS, command, env, f"pool {pool}, {workers} slot(s)")
    if running(settings, WORKERS):
        urls[WORKERS] = json.loads(_record_path(settings, WORKERS).read_text())["url"]
    return urls


def down(settings: Settings, grace: float = 20.0) -> list[str]:
    """Stop every service we started (workers first), with its whole process group; returns the names stopped."""
    stopped = []
    for name in [WORKERS, *services(settings)]:
        pid = running(settings, name)
        if pid is not None:
            _stop_group(pid, grace)
            stopped.append(name)
        _record_path(settings, name).unlink(missing_ok=True)
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
    pid = running(settings, WORKERS)
    if pid is not None:  # workers have no health URL: alive is healthy
        url = json.loads(_record_path(settings, WORKERS).read_text())["url"]
        report[WORKERS] = {"url": url, "pid": pid, "running": True, "healthy": True}
    return report
