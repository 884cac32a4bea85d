"""The shape of the orchestration code, from its syntax trees: function lengths and parameter counts, where
settings are built and the environment is written (the layering test and `bench_code_shape` read it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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


def _enclosing(tree: ast.AST) -> dict[ast.AST, str]:
    """Each node -> the name of the outermost function holding it ("" at module level)."""
    owner: dict[ast.AST, str] = {}
    for top in ast.iter_child_nodes(tree):
        name = top.name if isinstance(top, ast.FunctionDef | ast.AsyncFunctionDef) else ""
        for node in ast.walk(top):
            owner[node] = name
    return owner


def settings_constructions(path: Path) -> list[str]:
    """`file:function` of every `Settings(...)` call."""
    tree = ast.parse(path.read_text())
    owner = _enclosing(tree)
    return [
        f"{path.relative_to(ROOT)}:{owner.get(node, '')}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Settings"
    ]


def environ_writes(path: Path) -> list[str]:
    """`os.environ[...] = ...` and `os.environ.setdefault/update/pop(...)`."""
    tree = ast.parse(path.read_text())
    owner, found = _enclosing(tree), []

    def is_environ(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Subscript) and is_environ(t.value) for t in targets):
                found.append(f"{path.relative_to(ROOT)}:{owner.get(node, '')}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ENVIRON_WRITES and is_environ(node.func.value):
                found.append(f"{path.relative_to(ROOT)}:{owner.get(node, '')}")
    return found


def sources(packages: tuple[str, ...]) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def callers_of(path: Path, function: str) -> set[str]:
    """The functions of `path` that call `function` by name."""
    tree = ast.parse(path.read_text())
    owner = _enclosing(tree)
    return {
        owner.get(node, "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == function
    }
