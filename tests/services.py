"""Real services to lose, for tests and the fault benchmark: endpoints that go silent, servers to kill."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SilentServer:
    """Accepts every connection and never answers: a hung endpoint."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            with contextlib.suppress(OSError):
                self.held.append(self.listener.accept()[0])

    def close(self) -> None:
        self.closed = True
        for connection in [*self.held, self.listener]:
            connection.close()


class HangingProxy:
    """A TCP proxy to `upstream` (host, port); while `hang_prefix` is set, a request whose first line starts
    with it (b"PUT /bucket/key...") is swallowed and its connection never answered (a hang mid-upload)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.hang_prefix: bytes | None = None
        self.hung = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client = self.listener.accept()[0]
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        server = socket.create_connection(self.upstream)
        swallowing = False
        try:
            while not self.closed:
                ready, _, _ = select.select([client, server], [], [], 0.5)
                for source in ready:
                    data = source.recv(1 << 16)
                    if not data:
                        return
                    if source is client:
                        if self.hang_prefix and data.startswith(self.hang_prefix):
                            swallowing, self.hung = True, self.hung + 1
                        if not swallowing:
                            server.sendall(data)
                    elif not swallowing:
                        client.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            server.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{url}: no answer in {timeout:.0f} s")


def start_mlflow_server(folder: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real MLflow tracking server (SQLite under `folder`, kept across restarts on the same `port`); its URL."""
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--workers", "1"]
    command += ["--artifacts-destination", str(folder / "artifacts")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(folder / "server.log", "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(f"{url}/health", process)
    return process, url


def start_prefect_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """A real `prefect server start` (its own SQLite under `folder`); its API URL."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(folder), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(folder / "server.log", "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    wait_healthy(f"{api}/health", process)
    return process, api


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a server and every process it started (uvicorn workers included)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 9)
    process.wait()


def wait_for_log(process: subprocess.Popen, marker: str, timeout: float) -> bool:
    """Read `secateur run`'s `log: PATH` line from its stdout, then poll that file until `marker` appears."""
    log_path = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if log_path is None:
            line = process.stdout.readline()
            if line.startswith("log: "):
                log_path = Path(line.removeprefix("log: ").strip())
            continue
        if log_path.is_file() and marker in log_path.read_text(errors="replace"):
            return True
        time.sleep(0.05)
    return False
