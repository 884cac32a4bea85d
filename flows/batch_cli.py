"""Batch commands of the `secateur` CLI: run, retry, report, serve, deploy, stack."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from infra.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class PairFailures(RuntimeError):
    """Some pairs of a batch failed; the others finished (exit status 1)."""


def add_commands(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="run a batch file now (models x recipes) and print its summary")
    run.add_argument("batch", type=Path, help="batch YAML file")
    run.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    run.set_defaults(run=run_batch)

    retry = commands.add_parser("retry", help="rerun only the failed pairs of an earlier batch run")
    retry.add_argument("run_id", metavar="RUN_ID_OR_NAME", help="Prefect flow run id or name of the batch run")
    retry.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    retry.set_defaults(run=retry_batch)

    serve = commands.add_parser("serve", help="run a batch on a cron schedule (long-running, Prefect serve)")
    serve.add_argument("batch", type=Path)
    serve.add_argument("--cron", required=True, help='cron expression, e.g. "0 2 * * *"')
    serve.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(run=serve_batch)

    deploy = commands.add_parser("deploy", help="create a Prefect deployment of a batch on a work pool")
    deploy.add_argument("batch", type=Path)
    deploy.add_argument("--pool", required=True, help="work pool name (workers on GPU machines poll it)")
    deploy.add_argument("--cron", help='cron expression, e.g. "0 2 * * *"')
    deploy.add_argument("--image", help="container image for Docker/Kubernetes pools (default: run from source)")
    deploy.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    deploy.set_defaults(run=deploy_batch)

    report = commands.add_parser("report", help="the model x recipe table of a batch run, read from MLflow")
    report.add_argument(
        "batch_run", metavar="BATCH_RUN", help="MLflow run id, Prefect flow run id or name, or batch name (latest)"
    )
    report.add_argument("--format", choices=["table", "csv", "markdown"], default="table")
    report.add_argument("--json", action="store_true", help="print the report rows as one JSON object instead")
    report.set_defaults(run=report_batch)

    stack = commands.add_parser("stack", help="local Prefect server and MLflow UI over the state dir")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    stack.set_defaults(run=stack_command)


def load_batch(path: Path) -> tuple[dict, object]:
    """The raw mapping (what Prefect stores as the flow parameter) and its validated form."""
    from flows.batch_config import BatchConfig
    from pruning_core.zero_shot import unknown_tasks

    config = BatchConfig.from_yaml(path)
    unknown = unknown_tasks(config.evaluation.tasks)
    if unknown:
        raise ValueError(f"evaluation.tasks: unknown lm-eval task(s): {', '.join(unknown)}")
    return yaml.safe_load(path.read_text()), config


def _run_and_report(config: dict, only: list[list[str]] | None = None, verbose: bool = False) -> dict:
    from flows.batch import compress_batch
    from flows.console import route_logs
    from flows.local_api import local_prefect_api

    settings = Settings()
    print(f"log: {route_logs(settings.root, verbose)}", flush=True)
    with local_prefect_api(settings.root):
        state = compress_batch(config, only, return_state=True)
        return _report_run(settings, state)


def _report_run(settings: Settings, state) -> dict:
    from flows.batch import PairResult, run_record_path, summary_table

    run_id = str(state.state_details.flow_run_id)
    record_path = run_record_path(settings, run_id)
    if not record_path.is_file():  # failed before the summary: a bad batch or an unreachable service
        state.result()
    record = json.loads(record_path.read_text())
    results = [PairResult.model_validate(r) for r in record["results"]]
    print(summary_table(results))
    print(f"batch run {record['flow_run_name']} ({run_id}); MLflow run {record['mlflow_run_id']}")
    summary = {
        "flow_run_id": run_id,
        "flow_run_name": record["flow_run_name"],
        "results": [
            r.model_dump(include={"model", "recipe_name", "status", "sparsity", "perplexity", "model_uri", "error"})
            for r in results
        ],
    }
    failed = [r for r in results if r.status == "failed"]
    if failed:
        print(json.dumps(summary, sort_keys=True))
        raise PairFailures(f"{len(failed)} of {len(results)} pairs failed; rerun them with: secateur retry {run_id}")
    return summary


def run_batch(args: argparse.Namespace) -> dict:
    from infra.preflight import check_services

    config, _ = load_batch(args.batch)  # a bad batch fails here, before Prefect starts
    check_services(Settings())  # so does an unreachable store or MLflow
    return _run_and_report(config, verbose=args.verbose)


def find_run(settings: Settings, run: str) -> dict:
    """A batch run record by Prefect flow run id or name."""
    folder = settings.path("runs")
    direct = folder / f"{run}.json"
    if direct.is_file():
        return json.loads(direct.read_text())
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        record = json.loads(path.read_text())
        if record.get("flow_run_name") == run:
            return record
    raise LookupError(f"no batch run {run!r} under {folder}")


def retry_batch(args: argparse.Namespace) -> dict:
    record = find_run(Settings(), args.run_id)
    failed = [[r["model"], r["recipe_name"]] for r in record["results"] if r["status"] == "failed"]
    if not failed:
        print(f"batch run {record['flow_run_name']} had no failed pairs; nothing to retry")
        return {"flow_run_id": record["flow_run_id"], "retried": []}
    print(
        f"retrying {len(failed)} failed pairs of {record['flow_run_name']}: "
        + ", ".join(f"{Path(m).name} x {r}" for m, r in failed)
    )
    return _run_and_report(record["config"], failed, verbose=args.verbose) | {"retried": failed}


def report_batch(args: argparse.Namespace) -> dict:
    from infra.tracking import Tracker
    from tasks.review import batch_report, render

    report = batch_report(Tracker(Settings()), args.batch_run)
    if args.json:
        return report.model_dump(exclude={"rows": {"__all__": {"block_errors"}}})
    print(render(report, args.format), end="")
    return {}


def _use_stack_api(settings: Settings) -> None:
    """serve/deploy need a lasting Prefect API: the one the user configured, else the local stack's."""
    from infra import stack

    if os.environ.get("PREFECT_API_URL"):
        return
    if stack.running(settings, "prefect") is None:
        raise RuntimeError("no Prefect server: run `secateur stack up` first, or set PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = stack.services(settings)["prefect"].url() + "/api"


def serve_batch(args: argparse.Namespace) -> dict:
    config, batch = load_batch(args.batch)
    _use_stack_api(Settings())
    from flows.batch import compress_batch

    print(f"serving batch {batch.name} on cron {args.cron!r}; Ctrl-C stops")
    compress_batch.serve(name=batch.name, cron=args.cron, parameters={"config": config})
    return {"batch": batch.name, "cron": args.cron}


def deploy_batch(args: argparse.Namespace) -> dict:
    config, batch = load_batch(args.batch)
    _use_stack_api(Settings())
    from flows.batch import compress_batch

    if args.image:
        flow, options = compress_batch, {"image": args.image, "build": False, "push": False}
    else:
        flow = compress_batch.from_source(source=str(PROJECT_ROOT), entrypoint="flows/batch.py:compress_batch")
        options = {}
    deployment_id = flow.deploy(
        name=batch.name,
        work_pool_name=args.pool,
        cron=args.cron,
        parameters={"config": config},
        print_next_steps=False,
        **options,
    )
    print(
        f"deployment compress-batch/{batch.name} ({deployment_id}) on work pool {args.pool!r}"
        + (f", cron {args.cron!r}" if args.cron else "")
    )
    print(f"start a worker on each GPU machine: prefect worker start --pool {args.pool}")
    return {"deployment_id": str(deployment_id), "name": f"compress-batch/{batch.name}", "pool": args.pool}


def stack_command(args: argparse.Namespace) -> dict:
    from infra import stack

    settings = Settings()
    if args.action == "up":
        urls = stack.up(settings)
        print(f"Prefect UI: {urls['prefect']}   (export PREFECT_API_URL={urls['prefect']}/api to use it)")
        print(f"MLflow UI:  {urls['mlflow']}")
        return urls
    if args.action == "down":
        stopped = stack.down(settings)
        print("stopped " + (", ".join(stopped) if stopped else "nothing (no stack was running)"))
        return {"stopped": stopped}
    report = stack.status(settings)
    for name, entry in report.items():
        state = "running" if entry["healthy"] else ("starting" if entry["running"] else "stopped")
        print(f"{name:<8} {state:<9} {entry['url']}" + (f"  pid {entry['pid']}" if entry["pid"] else ""))
    return report
