"""A pool's workers on one machine: one worker process per GPU (or CPU slot), each running one pair at a time,
warm (`flows.warm_worker`: the pair runs inside it, no fresh interpreter per pair) or, with `fresh_process`,
Prefect's process worker (a new process per pair). A kill -9 loses one slot's pair, which the batch runs again
elsewhere."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

# A pair's own log lines (resumes, mirrored checkpoints, reuse from the store) reach the worker's log and the
# Prefect UI: Prefect attaches its handlers to these loggers too. The user's environment wins.
# Workers look for scheduled pair runs every second, not Prefect's 10 (a pair waits for a free worker, not a poll).
WORKER_DEFAULTS = {
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks,infra,flows,pruning_core",
    "PREFECT_WORKER_QUERY_SECONDS": "1",
}


def worker_slots(gpus: str | None, slots: int) -> list[tuple[str, dict[str, str]]]:
    """(worker name suffix, environment) per worker: a GPU each, or an equal share of the CPU threads."""
    if gpus:
        indices = [index.strip() for index in gpus.split(",") if index.strip()]
        if not all(index.isdigit() for index in indices):
            raise ValueError(f"--gpus {gpus!r}: give GPU indices such as 0,1,2,3")
        return [(f"gpu{index}", {"CUDA_VISIBLE_DEVICES": index, "SECATEUR_DEVICE": "cuda"}) for index in indices]
    if slots < 1:
        raise ValueError(f"--slots {slots}: give 1 or more")
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // slots))
    return [(f"cpu{slot}", {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}) for slot in range(slots)]


# A slot that dies this soon after it started is broken (no API, bad settings), not lost: the workers stop.
MIN_SLOT_SECONDS = 30.0


@dataclass
class _Slot:
    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    started: float = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, env=self.env)
        self.started = time.monotonic()


def _slot_command(pool: str, name: str, fresh_process: bool) -> list[str]:
    if fresh_process:  # Prefect's process worker: a new interpreter per flow run
        return [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                "--limit", "1", "--name", name]  # fmt: skip
    return [sys.executable, "-m", "flows.warm_worker", "--pool", pool, "--name", name]


def run_workers(pool: str, slots: list[tuple[str, dict[str, str]]], fresh_process: bool = False) -> None:
    """One worker process per slot, each running at most one pair at a time: warm (`flows.warm_worker`, pairs
    run inside it) unless `fresh_process`. A slot that dies (kill -9, out of memory) is started again; one that
    dies within MIN_SLOT_SECONDS of its start stops them all. Runs until then or until interrupted."""
    host = socket.gethostname()
    workers = []
    for suffix, env in slots:
        name = f"{host}-{os.getpid()}-{suffix}"
        workers.append(_Slot(name, _slot_command(pool, name, fresh_process), {**WORKER_DEFAULTS, **os.environ, **env}))
    for slot in workers:
        slot.start()
    kind = "a fresh process per pair" if fresh_process else "warm"
    print(f"{len(workers)} worker(s) on pool {pool!r} ({kind}): {', '.join(w.name for w in workers)}", flush=True)
    try:
        while True:
            time.sleep(1)
            for slot in workers:
                code = slot.process.poll()
                if code is None:
                    continue
                if time.monotonic() - slot.started < MIN_SLOT_SECONDS:
                    raise RuntimeError(f"worker {slot.name} stopped (exit {code}) right after it started; all stopped")
                print(f"worker {slot.name} stopped (exit {code}): starting it again", flush=True)
                slot.start()
    finally:
        _stop([slot.process for slot in workers if slot.process is not None])


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
