"""A pool's workers on one machine: one `prefect worker` per GPU (or CPU slot), each running one pair at a time,
each pair in a process of its own (a kill -9 loses one pair, which the batch runs again elsewhere)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

# A pair's own log lines (resumes, mirrored checkpoints, reuse from the store) reach the worker's log and the
# Prefect UI: Prefect attaches its handlers to these loggers too. The user's environment wins.
# Workers look for scheduled pair runs every 2 s, not Prefect's 10 (a pair waits for a free worker, not a poll).
WORKER_DEFAULTS = {
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks,infra,flows,pruning_core",
    "PREFECT_WORKER_QUERY_SECONDS": "2",
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


def run_workers(pool: str, slots: list[tuple[str, dict[str, str]]]) -> None:
    """One `prefect worker` per slot, each running at most one pair at a time, until one stops (an error) or
    this process is interrupted; then all are stopped."""
    host = socket.gethostname()
    workers = []
    for name, env in slots:
        command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
        command += ["--limit", "1", "--name", f"{host}-{os.getpid()}-{name}"]
        workers.append(subprocess.Popen(command, env={**WORKER_DEFAULTS, **os.environ, **env}))
    names = ", ".join(f"{host}-{os.getpid()}-{n}" for n, _ in slots)
    print(f"{len(workers)} worker(s) on pool {pool!r}: {names}", flush=True)
    try:
        while all(worker.poll() is None for worker in workers):
            time.sleep(1)
        stopped = next(w for w in workers if w.poll() is not None)
        raise RuntimeError(f"a worker stopped (exit {stopped.returncode}); the others were stopped too")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
        for worker in workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
