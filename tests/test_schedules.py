"""Schedules and services: a Prefect deployment on a work pool, and the local stack's lifecycle."""

from __future__ import annotations

import asyncio
import json
import os
import time

import psutil
import pytest
import yaml

from flows.cli import main
from flows.workers import MIN_SLOT_SECONDS
from tests.conftest import batch_mapping, save_tiny


def test_deploy_creates_a_cron_deployment_on_a_work_pool(
    prefect_api, pipeline_home, tmp_path, tiny_tokenizer, monkeypatch, capsys
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    model = str(save_tiny(tmp_path / "tiny", tiny_tokenizer))
    batch = tmp_path / "nightly.yaml"
    batch.write_text(
        yaml.safe_dump(batch_mapping([model], [{"name": "w50", "method": "wanda", "sparsity": 0.5}], name="nightly"))
    )

    async def create_pool() -> None:
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="gpu-pool", type="process"))

    asyncio.run(create_pool())
    assert main(["deploy", str(batch), "--pool", "gpu-pool", "--cron", "0 2 * * *", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    async def read():
        async with get_client() as client:
            return await client.read_deployment(summary["deployment_id"])

    deployment = asyncio.run(read())
    assert deployment.name == "nightly" and deployment.work_pool_name == "gpu-pool"
    assert deployment.entrypoint == "flows.batch.compress_batch", "the installed package, not this checkout"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert deployment.parameters["config"]["models"] == [model] and deployment.parameters["pool"] == "gpu-pool"

    async def read_pair_flow():
        async with get_client() as client:
            return await client.read_deployment_by_name("compress-model/gpu-pool")

    pair_flow = asyncio.run(read_pair_flow())
    assert pair_flow.entrypoint == "flows.batch.compress_model" and pair_flow.work_pool_name == "gpu-pool"


def test_serve_and_deploy_need_a_prefect_server(pipeline_home, tmp_path, tiny_tokenizer, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    model = str(save_tiny(tmp_path / "tiny", tiny_tokenizer))
    batch = tmp_path / "nightly.yaml"
    batch.write_text(yaml.safe_dump(batch_mapping([model], [{"name": "w50", "method": "wanda", "sparsity": 0.5}])))
    assert main(["serve", str(batch), "--cron", "0 2 * * *"]) == 1
    assert "run `secateur stack up` first, or set PREFECT_API_URL" in capsys.readouterr().err


@pytest.mark.slow
def test_stack_up_status_down_leaves_no_process(pipeline_home, monkeypatch, capsys):
    monkeypatch.setenv("SECATEUR_PREFECT_PORT", str(_free_port()))
    monkeypatch.setenv("SECATEUR_MLFLOW_PORT", str(_free_port()))
    monkeypatch.setenv("PREFECT_HOME", str(pipeline_home / "prefect"))
    try:
        assert main(["stack", "up", "--workers", "2", "--pool", "trial", "--json"]) == 0
        urls = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert main(["stack", "status", "--json"]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["prefect"]["healthy"] and report["mlflow"]["healthy"] and report["workers"]["running"]
        assert report["mlflow"]["url"] == urls["mlflow"] and urls["workers"] == "pool trial, 2 slot(s)"
        # Both worker slots come up and register with the stack's Prefect server under the pool.
        assert sorted(_pool_workers(urls["prefect"] + "/api", "trial", expected=2)) == ["cpu0", "cpu1"]
        pids = [report[name]["pid"] for name in ("prefect", "mlflow", "workers")]
        group = [p for p in psutil.process_iter(["pid"]) if _group(p) in pids]
        assert len(group) >= 5  # two servers, the worker CLI and its two warm workers
        # A slot lost to kill -9 is started again; the other slot goes on untouched.
        slots = _warm_slots(report["workers"]["pid"])
        assert sorted(slots) == ["cpu0", "cpu1"]
        time.sleep(max(0.0, MIN_SLOT_SECONDS + 1 - (time.time() - slots["cpu0"].create_time())))
        slots["cpu0"].kill()
        deadline = time.monotonic() + 30
        while _warm_slots(report["workers"]["pid"]).get("cpu0", slots["cpu0"]).pid == slots["cpu0"].pid:
            assert time.monotonic() < deadline, "the killed slot was not started again"
            time.sleep(0.5)
        assert _warm_slots(report["workers"]["pid"])["cpu1"].pid == slots["cpu1"].pid
        group += [p for p in psutil.process_iter(["pid"]) if _group(p) in pids and p not in group]
    finally:
        assert main(["stack", "down"]) == 0
    assert "stopped workers, prefect, mlflow" in capsys.readouterr().out
    assert not [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert main(["stack", "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not report["prefect"]["running"] and not report["mlflow"]["running"]


def _warm_slots(workers_pid: int) -> dict[str, psutil.Process]:
    """The live warm worker processes under `secateur worker`, by slot name suffix."""
    slots = {}
    for child in psutil.Process(workers_pid).children():
        try:
            command = child.cmdline()
        except psutil.Error:  # the killed one, not yet reaped
            continue
        if "flows.warm_worker" in command:
            slots[command[command.index("--name") + 1].rsplit("-", 1)[1]] = child
    return slots


def _pool_workers(api: str, pool: str, expected: int, timeout: float = 90) -> list[str]:
    """The slot names of the workers that have sent a heartbeat for `pool` (waits for `expected` of them)."""
    import time
    import urllib.request

    deadline, names = time.monotonic() + timeout, []
    while len(names) < expected and time.monotonic() < deadline:
        time.sleep(1)
        request = urllib.request.Request(
            f"{api}/work_pools/{pool}/workers/filter", data=b"{}", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                names = [worker["name"].rsplit("-", 1)[-1] for worker in json.loads(response.read())]
        except OSError:  # the pool is created by the worker CLI a moment after it starts
            names = []
    return names


def _group(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, psutil.Error):
        return None


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
