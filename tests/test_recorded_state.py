"""A state dir recorded by an earlier pipeline (tests/recorded/record_state.py): its batch again is all cache hits.

Refactors of the orchestration keep every fingerprint, cache key and result record readable: a user's
state dir from before an upgrade is not recomputed after it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flows.batch import compress_batch

RECORDED = Path(__file__).resolve().parent / "recorded" / "state"


def _files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_a_batch_recorded_before_the_change_is_all_cache_hits(prefect_api, tmp_path, monkeypatch):
    state = tmp_path / "state"
    shutil.copytree(RECORDED, state)
    home = state / "home"
    monkeypatch.setenv("SECATEUR_HOME", str(home))
    monkeypatch.setenv("SECATEUR_ARTIFACTS", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = json.loads((state / "batch.json").read_text())
    config["models"] = [str(state / "tiny-recorded")]
    made = {part: _files(home / part) for part in ("models", "calibration", "evaluations")}

    results = compress_batch(config)

    assert [(r.recipe_name, r.status) for r in results] == [
        ("wanda50", "completed"),
        ("sgpt24", "completed"),
        ("width", "completed"),
    ]
    for result in results:
        stages = {stage: state for stage, state in result.task_states.items() if stage != "fetch"}
        assert set(stages.values()) == {"Cached"}, (result.recipe_name, result.task_states)
    assert {"prune", "recover", "evaluate", "evaluate_before_recovery"} <= set(results[2].task_states)
    assert {part: _files(home / part) for part in made} == made, "nothing was made again"
    assert [round(r.perplexity["wiki"], 2) for r in results] == [259.71, 260.51, 260.3]
    reports = list((tmp_path / "store").rglob("report/report.json"))
    assert len(reports) == 3
    for report in reports:  # the published record names state paths portably, never this machine's
        text = report.read_text()
        assert str(home) not in text and "$SECATEUR_HOME/models/" in text
