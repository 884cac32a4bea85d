"""Benchmark (run on demand): the shape of the orchestration code, for refactoring notes.

    .venv/bin/python -m tests.benchmarks.bench_code_shape [--label before]

Per package: lines. Across flows/, tasks/, infra/: the longest functions, the largest positional-parameter
counts, where `Settings(` is constructed and where `os.environ` is written. Writes
tests/benchmarks/results/code-shape-<timestamp>.json.
"""

from __future__ import annotations

import argparse

from tests.benchmarks.common import write_results
from tests.code_shape import (
    ORCHESTRATION,
    PACKAGES,
    environ_writes,
    functions,
    settings_constructions,
    sources,
)


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
