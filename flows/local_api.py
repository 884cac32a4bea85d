"""The embedded default's Prefect API: a server process this process owns and waits for.

Prefect's own temporary server is stopped by an `atexit` hook, so a batch killed by SIGTERM or kill -9
left it running, and on a busy machine its start could race another run for the same port. Here the
server is started on a port this process picked, must answer its health check (the process still
alive, so the answer is its own) before any flow runs, and is asked by the kernel to stop when its
parent dies (Linux `PR_SET_PDEATHSIG`), however the parent ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

START_ATTEMPTS = 3
_PR_SET_PDEATHSIG = 1


class PrefectServerError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGTERM to it when its parent exits."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"}
    with open(log, "ab") as output:
        return subprocess.Popen(
            command,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )


def _wait_healthy(process: subprocess.Popen, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/api/health").status_code == 200 and process.poll() is None:
                    return True
            time.sleep(0.2)
    return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def local_prefect_api(state_dir: Path) -> Iterator[str | None]:
    """Point Prefect at a server of this process for the block; none is started when an API is configured."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))
    log = state_dir / "logs" / "prefect-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(START_ATTEMPTS):
        url = f"http://127.0.0.1:{_free_port()}"
        process = _start(int(url.rsplit(":", 1)[1]), log)
        if _wait_healthy(process, url, timeout):
            break
        _stop(process)  # lost the port to another process, or too slow: a fresh port
    else:
        raise PrefectServerError(f"the local Prefect server did not start in {START_ATTEMPTS} attempts (see {log})")
    try:
        with temporary_settings(updates={PREFECT_API_URL: f"{url}/api"}):
            try:
                yield url
            finally:
                _send_pending_logs()
    finally:
        _stop(process)


def _send_pending_logs() -> None:
    """Flow-run logs still queued go to the server before it stops (else Prefect prints send errors)."""
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(Exception):
        APILogWorker.drain_all(timeout=5)
