"""A warm pool worker: one long-lived process per GPU (or CPU) slot that runs the pool's flow runs in itself.

A `prefect worker --type process` starts a fresh interpreter for every flow run, which then imports torch,
transformers, Prefect and MLflow again: seconds per pair before any work. This worker is a Prefect worker
(`BaseWorker`: it polls the pool, claims a run by proposing Pending, heartbeats, shows in the UI) whose
infrastructure is its own process, already warm: each run executes in a fresh thread of it through Prefect's
flow engine, one at a time (limit 1). Isolation stays per slot: a kill -9 loses this slot's one pair, the
batch's watcher runs that pair again elsewhere once its heartbeat goes silent, and `flows.workers` starts
the slot again.

    python -m flows.warm_worker --pool POOL --name NAME
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import logging
import os
import threading
import time
import warnings
from functools import cache
from typing import Any

import anyio
from prefect.client.schemas.objects import FlowRun
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult

log = logging.getLogger(__name__)

# Imported once per slot instead of once per pair: what every pair needs beyond the flows themselves.
PRELOAD = ("torch", "transformers", "mlflow", "matplotlib.pyplot", "safetensors.torch", "flows.batch")
CANCEL_EXIT_SECONDS = 2.0  # after a cancel, time for Prefect to record it before the slot restarts


class WarmWorkerResult(BaseWorkerResult):
    pass


@cache
def _flow(entrypoint: str) -> Any:
    """The flow a module-path entrypoint names (`flows.batch.compress_model`): imported once per process."""
    if ":" in entrypoint:
        raise ValueError(f"warm workers run module-path deployments (flows.batch.compress_model), not {entrypoint!r}")
    module, _, name = entrypoint.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _deployment_entrypoint(flow_run: FlowRun) -> str:
    from prefect.client.orchestration import get_client

    if flow_run.deployment_id is None:
        raise ValueError(f"flow run {flow_run.id} has no deployment")
    with get_client(sync_client=True) as client:
        entrypoint = client.read_deployment(flow_run.deployment_id).entrypoint
    if not entrypoint:
        raise ValueError(f"deployment {flow_run.deployment_id} has no entrypoint")
    return entrypoint


def execute(flow_run: FlowRun) -> int:
    """Run `flow_run` in this process through Prefect's engine: 0 when the engine recorded its end (completed
    or failed), 1 when it could not (Prefect then records a crash)."""
    from prefect.flow_engine import run_flow

    try:
        flow = _flow(_deployment_entrypoint(flow_run))
        run_flow(flow, flow_run=flow_run, return_type="state")
        return 0
    except Exception:
        log.exception("flow run %s could not run", flow_run.name)
        return 1
    finally:
        _release_memory()


def _release_memory() -> None:
    """What one pair leaves (models, activations) goes before the next: this process outlives it."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def execute_in_fresh_thread(flow_run: FlowRun) -> int:
    """A thread of its own per run: thread-local state (MLflow's active run stack) never reaches the next one."""
    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(execute(flow_run)), name=f"flow-run-{flow_run.name}")
    thread.start()
    thread.join()
    return outcome[0] if outcome else 1


with warnings.catch_warnings():
    # Registered under "process" (the pool's type, each slot being a process): Prefect warns that this
    # replaces its own process worker in this process's registry, which is the intent here.
    warnings.simplefilter("ignore")

    class WarmWorker(BaseWorker[BaseJobConfiguration, BaseVariables, WarmWorkerResult]):
        type = "process"
        job_configuration = BaseJobConfiguration
        _description = "Runs each flow run in this worker's own long-lived process (secateur)."

        async def run(
            self,
            flow_run: FlowRun,
            configuration: BaseJobConfiguration,
            task_status: anyio.abc.TaskStatus[int] | None = None,
        ) -> WarmWorkerResult:
            if task_status is not None:
                task_status.started(os.getpid())
            code = await anyio.to_thread.run_sync(execute_in_fresh_thread, flow_run)
            return WarmWorkerResult(identifier=str(os.getpid()), status_code=code)

        async def kill_infrastructure(self, infrastructure_pid: str, configuration: Any, grace_seconds: int = 30):
            """A cancelled run's infrastructure is this slot: it exits once Prefect has recorded the cancel, and
            its supervisor (`flows.workers`) starts it again."""
            log.warning("flow run cancelled: this slot restarts in %.0f s", CANCEL_EXIT_SECONDS)
            threading.Timer(CANCEL_EXIT_SECONDS, os._exit, args=(143,)).start()


def preload() -> float:
    """Import what pairs need; returns the seconds it took."""
    started = time.perf_counter()
    for module in PRELOAD:
        importlib.import_module(module)
    return time.perf_counter() - started


async def serve(pool: str, name: str) -> None:
    await WarmWorker(work_pool_name=pool, name=name, limit=1, create_pool_if_not_found=False).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    seconds = preload()
    print(f"warm worker {args.name}: imports ready in {seconds:.1f} s", flush=True)
    asyncio.run(serve(args.pool, args.name))


if __name__ == "__main__":
    main()
