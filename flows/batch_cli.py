"""Batch commands of the `secateur` CLI: run, retry, report, serve, deploy, stack."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from infra.settings import Settings

if TYPE_CHECKING:
    from flows.batch_config import BatchConfig

POOL_HELP = "run each pair as a flow run on this Prefect work pool (workers: `secateur worker --pool NAME`)"


class PairFailures(RuntimeError):
    """Some pairs of a batch failed; the others finished (exit status 1)."""


def add_commands(commands: argparse._SubParsersAction) -> None:
    _add_run_commands(commands)
    _add_pool_commands(commands)
    _add_review_commands(commands)


def _add_run_commands(commands: argparse._SubParsersAction) -> None:
    """run, retry, serve: a batch here (its pairs here or on a pool)."""
    run = commands.add_parser("run", help="run a batch file now (models x recipes) and print its summary")
    run.add_argument("batch", type=Path, help="batch YAML file")
    run.add_argument("--pool", help=POOL_HELP)
    run.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    run.set_defaults(run=run_batch)

    retry = commands.add_parser("retry", help="rerun only the failed pairs of an earlier batch run")
    retry.add_argument("run_id", metavar="RUN_ID_OR_NAME", help="Prefect flow run id or name of the batch run")
    retry.add_argument("--pool", help=POOL_HELP)
    retry.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    retry.set_defaults(run=retry_batch)

    serve = commands.add_parser("serve", help="run a batch on a cron schedule (long-running, Prefect serve)")
    serve.add_argument("batch", type=Path)
    serve.add_argument("--cron", required=True, help='cron expression, e.g. "0 2 * * *"')
    serve.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(run=serve_batch)


def _add_pool_commands(commands: argparse._SubParsersAction) -> None:
    """worker, deploy, stack: the services and workers a pool runs on."""
    worker = commands.add_parser("worker", help="Prefect workers on a pool: one per GPU (or --slots), a pair each")
    worker.add_argument("--pool", required=True, help="work pool to take pairs from (created if missing)")
    worker.add_argument("--gpus", help="GPU indices, e.g. 0,1,2,3: one worker each, pinned by CUDA_VISIBLE_DEVICES")
    worker.add_argument("--slots", type=int, default=1, help="without --gpus: workers on this machine's CPUs")
    worker.add_argument(
        "--fresh-process",
        action="store_true",
        help="a new Python process per pair (Prefect's process worker) instead of warm workers that run pairs in "
        "themselves: slower to start each pair, nothing carried between pairs",
    )
    worker.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    worker.set_defaults(run=worker_command)

    deploy = commands.add_parser("deploy", help="create a Prefect deployment of a batch on a work pool")
    deploy.add_argument("batch", type=Path)
    deploy.add_argument("--pool", required=True, help="work pool name (workers on GPU machines poll it)")
    deploy.add_argument("--cron", help='cron expression, e.g. "0 2 * * *"')
    deploy.add_argument("--batch-pool", help="work pool of the batch run itself (default: --pool)")
    deploy.add_argument("--image", help="container image for Docker/Kubernetes pools (default: installed package)")
    deploy.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    deploy.set_defaults(run=deploy_batch)

    stack = commands.add_parser("stack", help="local Prefect server and MLflow UI over the state dir")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.add_argument(
        "--workers", type=int, default=0, metavar="N", help="up: also N worker slots on --pool (try a pool here)"
    )
    stack.add_argument("--pool", default="local", help="up --workers: the work pool they serve (default: local)")
    stack.add_argument(
        "--postgres",
        action="store_true",
        help="up: servers on a PostgreSQL cluster of the state dir (initdb/pg_ctl), as in production, not SQLite",
    )
    stack.add_argument("--purge", action="store_true", help="down: delete the PostgreSQL cluster's data too")
    stack.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    stack.set_defaults(run=stack_command)


def _add_review_commands(commands: argparse._SubParsersAction) -> None:
    """report, promote: what a batch gave, and what ships."""
    report = commands.add_parser("report", help="the model x recipe table of a batch run, read from MLflow")
    report.add_argument(
        "batch_run", metavar="BATCH_RUN", help="MLflow run id, Prefect flow run id or name, or batch name (latest)"
    )
    report.add_argument("--format", choices=["table", "csv", "markdown"], default="table")
    report.add_argument("--json", action="store_true", help="print the report rows as one JSON object instead")
    report.set_defaults(run=report_batch)

    promote = commands.add_parser(
        "promote", help="move a model's champion alias (MLflow Model Registry) to a variant by hand"
    )
    promote.add_argument("model", metavar="MODEL", help="the source model, as the batch file names it")
    promote.add_argument(
        "variant", metavar="RUN_OR_RECIPE", help="the pair's MLflow run id, or a recipe name (its latest finished run)"
    )
    promote.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    promote.set_defaults(run=promote_variant)


def load_batch(path: Path) -> tuple[dict, object]:
    """The raw mapping (what Prefect stores as the flow parameter) and its validated form."""
    from flows.batch_config import BatchConfig
    from pruning_core.zero_shot import unknown_tasks

    data = BatchConfig.read_mapping(path)  # read once: the file could change between two reads
    config = BatchConfig.model_validate(data)
    unknown = unknown_tasks(config.evaluation.tasks)
    if unknown:
        raise ValueError(f"evaluation.tasks: unknown lm-eval task(s): {', '.join(unknown)}")
    return data, config


MEMORY_HINT = "lower calibration samples or seq_len, or set SECATEUR_MEMORY_LIMIT_GIB"


def memory_limit(settings: Settings) -> int | None:
    """The RAM a run may use, in bytes: the setting's, else None (what is available when it starts)."""
    return None if settings.memory_limit_gib is None else int(settings.memory_limit_gib * 2**30)


def check_batch_memory(config: BatchConfig, settings: Settings) -> None:
    """Each pair whose model is on this machine, sized from headers before any work: its prune and evaluation.

    Pairs run one after another, so each is checked alone. Models in S3 or on the hub are sized when they
    are loaded (`load_model` refuses weights that do not fit).
    """
    from pruning_core.memory import check_memory, evaluation_estimate, method_needs, model_shape, prune_estimate

    limit, device = memory_limit(settings), settings.device
    calibration = config.calibration
    needs = {method_needs(recipe.method) for recipe in config.recipes}
    for spec in config.models:
        shape = None if spec.startswith(("s3://", "hf://")) else model_shape(spec)
        if shape is None:
            continue
        for need in sorted(needs):
            estimate = prune_estimate(shape, calibration.samples, calibration.seq_len, need, device)
            check_memory(estimate, device, limit, MEMORY_HINT)
        if list(config.evaluation.datasets()):
            check_memory(evaluation_estimate(shape, config.evaluation.seq_len, device), device, limit, MEMORY_HINT)


def _run_and_report(
    settings: Settings, config: dict, only: list[list[str]] | None = None, *, verbose: bool, pool: str | None
) -> dict:
    """The batch flow in this process: its pairs here (own temporary Prefect API) or on a pool (shared API)."""
    from flows.batch import compress_batch
    from flows.console import route_logs
    from flows.local_api import local_prefect_api

    if pool:
        from flows.deployment import deploy_model_flow

        _use_stack_api(settings)
        deploy_model_flow(pool)
        api = contextlib.nullcontext()
    else:
        api = local_prefect_api(settings.root)
    print(f"log: {route_logs(settings.root, verbose)}", flush=True)
    with api, _prefect_watched(settings):
        state = compress_batch(config, only, pool, return_state=True)
        return _report_run(settings, state)


def _prefect_watched(settings: Settings):
    """A lost Prefect API ends the batch within `SECATEUR_SERVICE_TIMEOUT_SECONDS` x (retries + 1) plus one
    health check (40 s by default), where Prefect's client would retry it for good."""
    from prefect.settings import PREFECT_API_URL

    from infra.watchdog import watched

    def lost(line: str) -> None:
        print(f"secateur: error: {line}", file=sys.stderr, flush=True)
        os._exit(3)  # Prefect's threads are stuck on the lost API; everything durable is already on disk

    timeout = settings.service_timeout_seconds
    return watched(
        "the Prefect API",
        f"{PREFECT_API_URL.value().rstrip('/')}/health",
        timeout_seconds=timeout,
        lost_after_seconds=timeout * (settings.service_retries + 1),
        on_lost=lost,
    )


def _report_run(settings: Settings, state) -> dict:
    from flows.pairs import summary_table
    from flows.run_records import find_record, local_path

    run_id = str(state.state_details.flow_run_id)
    if not local_path(settings, run_id).is_file():  # failed before any pair: a bad batch or a service down
        state.result()
    record = find_record(settings, run_id)
    results = record.results
    print(summary_table(results))
    print(f"batch run {record.flow_run_name} ({run_id}); MLflow run {record.mlflow_run_id}")
    summary = {
        "flow_run_id": run_id,
        "flow_run_name": record.flow_run_name,
        "results": [
            r.model_dump(include={"model", "recipe_name", "status", "sparsity", "perplexity", "model_uri", "error"})
            for r in results
        ],
    }
    failed = [r for r in results if r.status == "failed"]
    if state.is_failed() and not failed and record.finished:
        state.result()  # every pair done, the batch's own bookkeeping (MLflow) failed: that one line
    if failed or not record.finished:
        print(json.dumps(summary, sort_keys=True))
        raise PairFailures(f"{len(failed)} of {len(results)} pairs failed; rerun them with: secateur retry {run_id}")
    return summary


def run_batch(args: argparse.Namespace, settings: Settings) -> dict:
    from infra.preflight import check_services

    config, batch = load_batch(args.batch)  # a bad batch fails here, before Prefect starts
    if args.pool is None or settings.memory_limit_gib is not None:  # a pool's workers size their own RAM
        check_batch_memory(batch, settings)  # so does one that cannot fit in memory
    check_services(settings)  # and an unreachable store or MLflow
    return _run_and_report(settings, config, verbose=args.verbose, pool=args.pool)


def retry_batch(args: argparse.Namespace, settings: Settings) -> dict:
    from flows.run_records import find_record

    record = find_record(settings, args.run_id)
    unfinished = record.unfinished_pairs()
    if not unfinished:
        print(f"batch run {record.flow_run_name} had no failed pairs; nothing to retry")
        return {"flow_run_id": record.flow_run_id, "retried": []}
    print(
        f"retrying {len(unfinished)} failed or unfinished pairs of {record.flow_run_name}: "
        + ", ".join(f"{Path(m).name} x {r}" for m, r in unfinished)
    )
    pool = args.pool or record.pool
    return _run_and_report(settings, record.config, unfinished, verbose=args.verbose, pool=pool) | {
        "retried": unfinished
    }


def report_batch(args: argparse.Namespace, settings: Settings) -> dict:
    from infra.tracking import Tracker
    from tasks.review import batch_report, render

    report = batch_report(Tracker(settings), args.batch_run)
    if args.json:
        return report.model_dump(exclude={"rows": {"__all__": {"block_errors"}}})
    print(render(report, args.format), end="")
    return {}


def promote_variant(args: argparse.Namespace, settings: Settings) -> dict:
    from infra.registry import CHAMPION
    from infra.tracking import Tracker
    from tasks.registration import promote

    version = promote(Tracker(settings), args.model, args.variant)
    print(f"{version.name}: alias {CHAMPION} -> version {version.version} ({version.source})")
    return version.model_dump() | {"alias": CHAMPION}


def _use_stack_api(settings: Settings) -> None:
    """serve/deploy need a lasting Prefect API: the one the user configured, else the local stack's."""
    from infra import stack

    if os.environ.get("PREFECT_API_URL"):
        return
    if stack.running(settings, "prefect") is None:
        raise RuntimeError("no Prefect server: run `secateur stack up` first, or set PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = stack.services(settings)["prefect"].url() + "/api"


def serve_batch(args: argparse.Namespace, settings: Settings) -> dict:
    config, batch = load_batch(args.batch)
    check_batch_memory(batch, settings)  # served batches run their pairs here
    _use_stack_api(settings)
    from flows.batch import compress_batch

    print(f"serving batch {batch.name} on cron {args.cron!r}; Ctrl-C stops")
    compress_batch.serve(name=batch.name, cron=args.cron, parameters={"config": config})
    return {"batch": batch.name, "cron": args.cron}


def deploy_batch(args: argparse.Namespace, settings: Settings) -> dict:
    """The batch flow on `--batch-pool` (default `--pool`) and the pair flow on `--pool`, by module path.

    Workers import both from the installed package (or the image), never from this machine's checkout.
    """
    config, batch = load_batch(args.batch)
    _use_stack_api(settings)
    from flows.batch import compress_batch
    from flows.deployment import deploy_by_module_path, deploy_model_flow
    from flows.pool import model_deployment

    batch_pool = args.batch_pool or args.pool
    deploy_model_flow(args.pool, args.image)
    [deployment_id] = deploy_by_module_path(
        [compress_batch],
        batch_pool,
        args.image,
        name=batch.name,
        cron=args.cron,
        parameters={"config": config, "pool": args.pool},
    )
    print(
        f"deployment compress-batch/{batch.name} ({deployment_id}) on work pool {batch_pool!r}"
        + (f", cron {args.cron!r}" if args.cron else "")
        + f"; its pairs run as {model_deployment(args.pool)} on {args.pool!r}"
    )
    print(f"start workers on each GPU machine: secateur worker --pool {args.pool} --gpus 0,1,...")
    if batch_pool == args.pool:
        print("(the batch run itself holds one worker slot while it waits; --batch-pool puts it elsewhere)")
    return {
        "deployment_id": str(deployment_id),
        "name": f"compress-batch/{batch.name}",
        "pool": args.pool,
        "batch_pool": batch_pool,
    }


def stack_command(args: argparse.Namespace, settings: Settings) -> dict:
    from infra import stack

    if args.action == "up":
        if args.workers < 0:
            raise ValueError(f"--workers {args.workers}: give 0 or more")
        urls = stack.up(settings, workers=args.workers, pool=args.pool, use_postgres=args.postgres)
        print(f"Prefect UI: {urls['prefect']}")
        print(f"MLflow UI:  {urls['mlflow']}")
        if stack.POSTGRES in urls:
            print(f"PostgreSQL: {urls[stack.POSTGRES]}  (databases prefect, mlflow)")
        print("Clients:    export " + " ".join(f"{key}={value}" for key, value in urls["env"].items()))
        if stack.WORKERS in urls:
            print(f"Workers:    {urls[stack.WORKERS]}   (secateur run BATCH --pool {args.pool})")
        return urls
    if args.action == "down":
        stopped = stack.down(settings, purge=args.purge)
        print("stopped " + (", ".join(stopped) if stopped else "nothing (no stack was running)"))
        return {"stopped": stopped}
    report = stack.status(settings)
    for name, entry in report.items():
        state = "running" if entry["healthy"] else ("starting" if entry["running"] else "stopped")
        print(f"{name:<8} {state:<9} {entry['url']}" + (f"  pid {entry['pid']}" if entry["pid"] else ""))
    return report


def worker_command(args: argparse.Namespace, settings: Settings) -> dict:
    """`secateur worker`: the pool's workers on this machine (`flows.workers`); Ctrl-C or SIGTERM stops all."""
    from flows.deployment import ensure_pool
    from flows.workers import run_workers, worker_slots

    slots = worker_slots(args.gpus, args.slots)
    _use_stack_api(settings)
    ensure_pool(args.pool)
    run_workers(args.pool, slots, fresh_process=args.fresh_process)
    return {}
