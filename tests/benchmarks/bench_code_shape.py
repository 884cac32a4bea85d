"""Benchmark (run on demand): the shape of the orchestration code, for refactoring notes.

    .venv/bin/python -m tests.benchmarks.bench_code_shape [--label before]

Per package: lines. Across flows/, tasks/, infra/: the longest functions, the largest positional-parameter
counts, where `Settings(` is constructed and where `os.environ` is written. Writes
tests/benchmarks/results/code-shape-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

from tests.benchmarks.common import write_results

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "tasks", "infra", "pruning_core")
ORCHESTRATION = ("flows", "tasks", "infra")
ENVIRON_WRITES = ("setdefault", "update", "pop", "__setitem__")


def functions(path: Path) -> list[dict]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            positional = [a for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
            found.append(
                {
                    "where": f"{path.relative_to(ROOT)}:{node.name}",
                    "lines": node.end_lineno - node.lineno + 1,
                    "positional": len(positional),
                    "parameters": len(positional) + len(node.args.kwonlyargs),
                }
            )
    return found


def settings_constructions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Settings"
    ]


def environ_writes(path: Path) -> list[str]:
    """`os.environ[...] = ...` and `os.environ.setdefault/update/pop(...)`."""
    tree = ast.parse(path.read_text())
    found = []

    def is_environ(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Subscript) and is_environ(t.value) for t in targets):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ENVIRON_WRITES and is_environ(node.func.value):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def sources(packages: tuple[str, ...]) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def measure() -> dict:
    orchestration = [f for path in sources(ORCHESTRATION) for f in functions(path)]
    return {
        "lines": {package: sum(len(p.read_text().splitlines()) for p in sources((package,))) for package in PACKAGES},
        "longest_functions": sorted(orchestration, key=lambda f: -f["lines"])[:12],
        "most_positional_parameters": sorted(orchestration, key=lambda f: -f["positional"])[:12],
        "functions_over_60_lines": sum(f["lines"] > 60 for f in orchestration),
        "functions_over_6_positional": sum(f["positional"] > 6 for f in orchestration),
        "settings_constructed": [s for path in sources(ORCHESTRATION) for s in settings_constructions(path)],
        "environ_writes": [w for path in sources((*ORCHESTRATION, "pruning_core")) for w in environ_writes(path)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="", help="a word stored with the results (before, after)")
    args = parser.parse_args()
    results = {"label": args.label, **measure()}
    write_results("code-shape", results, [])
    for key in ("lines", "functions_over_60_lines", "functions_over_6_positional"):
        print(key, results[key])
    print("settings constructed at", len(results["settings_constructed"]), "places")
    print("os.environ written at", len(results["environ_writes"]), "places")


if __name__ == "__main__":
    main()
