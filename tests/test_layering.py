"""Imports flow one way: flows -> tasks -> (pruning_core, infra); pruning_core stays pure torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.code_shape import ORCHESTRATION, callers_of, environ_writes, functions, settings_constructions, sources

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "pruning_core": {"prefect", "mlflow", "boto3", "botocore", "flows", "tasks", "infra"},
    "infra": {"pruning_core", "tasks", "flows", "prefect"},
    "tasks": {"flows"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_the_layering_allows(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
        if imported_roots(path) & FORBIDDEN[package]
    }
    assert not offenders, offenders


# --- flows/: the command line on top, then deployment, the batch flow, the pair flows, the pool watcher;
# the workers beside them (they start Prefect's own worker processes) ---

COMMAND_LINE = {"flows.cli", "flows.batch_cli", "flows.demo", "flows.console"}
FLOWS_FORBIDDEN = {
    "flows.workers": COMMAND_LINE | {"flows.deployment", "flows.batch", "flows.pair_stages", "flows.pool"},
    "flows.deployment": COMMAND_LINE,
    "flows.batch": COMMAND_LINE | {"flows.deployment"},
    "flows.pair_stages": COMMAND_LINE | {"flows.deployment", "flows.batch"},
    "flows.pool": COMMAND_LINE | {"flows.deployment", "flows.batch", "flows.pair_stages"},
}
# Where a process starts: the command line's main, the demo, and each flow (a worker runs one in its own process).
ENTRY_POINTS = {
    "flows/cli.py:main",
    "flows/demo.py:main",
    "flows/batch.py:compress_batch",
    "flows/pair_stages.py:flow_settings",
}


def flows_imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names if alias.name.startswith("flows."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flows."):
            modules.add(node.module)
    return modules


def test_flows_import_downwards_only_and_without_cycles():
    graph = {f"flows.{p.stem}": flows_imports(p) for p in (ROOT / "flows").glob("*.py")}
    wrong = {
        module: sorted(graph[module] & banned) for module, banned in FLOWS_FORBIDDEN.items() if graph[module] & banned
    }
    assert not wrong, wrong
    from graphlib import CycleError, TopologicalSorter

    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        pytest.fail(f"flows modules import each other: {error.args[1]}")


def test_settings_are_built_at_entry_points_only():
    built = {site for path in sources(ORCHESTRATION) for site in settings_constructions(path)}
    assert built <= ENTRY_POINTS, built - ENTRY_POINTS


def test_only_entry_points_write_the_environment():
    allowed_files = {"flows/cli.py", "flows/batch_cli.py", "flows/demo.py", "flows/console.py"}
    writes = {site for path in sources(ORCHESTRATION) for site in environ_writes(path)}
    elsewhere = {w for w in writes if w.split(":")[0] not in allowed_files} - {"infra/settings.py:prepare_environment"}
    assert not elsewhere, elsewhere
    callers = {
        f"{path.relative_to(ROOT)}:{name}"
        for path in sources(ORCHESTRATION)
        for name in callers_of(path, "prepare_environment")
    }
    assert callers <= ENTRY_POINTS, callers - ENTRY_POINTS


def test_orchestration_functions_stay_short_with_few_positional_parameters():
    found = [f for path in sources(ORCHESTRATION) for f in functions(path)]
    assert not [f["where"] for f in found if f["lines"] > 60]
    assert not [f["where"] for f in found if f["positional"] > 6]
