"""Zero-shot accuracy with lm-eval (`simple_evaluate` over `HFLM` wrapping a loaded model).

The paper's seven tasks run offline from local data through task definitions that include lm-eval's
stock tasks (see `local_task.yaml`); any other lm-eval task name, or `data="hub"`, uses lm-eval's own
definitions and downloads from the Hugging Face hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from pruning_core.zero_shot.sources import PAPER_TASKS, STOCK_YAML, find_documents

__all__ = [
    "HUB",
    "PAPER_TASKS",
    "TaskScore",
    "ZeroShotResult",
    "evaluate_zero_shot",
    "unknown_tasks",
    "write_task_definitions",
]

HUB = "hub"  # data source meaning "lm-eval's own definitions, data from the hub"
TEMPLATE = Path(__file__).with_name("local_task.yaml")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskScore:
    task: str
    metrics: dict[str, float]  # acc, acc_norm (where the task has it), and their stderr
    items: int  # documents scored
    split: str
    source: str  # the file the documents came from, or "hub"


@dataclass
class ZeroShotResult:
    scores: dict[str, TaskScore] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why


@dataclass(frozen=True)
class TaskDefinitions:
    include_path: Path  # folder of generated YAML, for TaskManager(include_path=...)
    splits: dict[str, str]
    sources: dict[str, str]
    skipped: dict[str, str]


def _stock_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def write_task_definitions(tasks: list[str], data: Path, out_root: Path) -> TaskDefinitions:
    """Local documents as jsonl in the stock schema plus one task YAML each, in a folder named by content."""
    found = {task: find_documents(data, task) for task in tasks}
    skipped = {task: f"no {task} data under {data}" for task, docs in found.items() if docs is None}
    documents = {task: docs for task, docs in found.items() if docs is not None}
    payload = {task: [docs.split, docs.rows] for task, docs in documents.items()}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = out_root / digest
    template = string.Template(TEMPLATE.read_text())
    if not (folder / "COMPLETE").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for task, docs in documents.items():
            data_file = folder / f"{task}.{docs.split}.jsonl"
            with data_file.open("w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row, default=str) + "\n" for row in docs.rows)
            (folder / f"{task}.yaml").write_text(
                template.substitute(
                    stock_yaml=_stock_tasks_dir() / STOCK_YAML[task],
                    task=task,
                    split=docs.split,
                    data_file=data_file,
                    validation_split="validation" if docs.split == "validation" else "null",
                    test_split="test" if docs.split == "test" else "null",
                )
            )
        (folder / "COMPLETE").touch()
    return TaskDefinitions(
        folder,
        {task: docs.split for task, docs in documents.items()},
        {task: docs.origin for task, docs in documents.items()},
        skipped,
    )


def _scores(results: dict, names: list[str], splits: dict[str, str], sources: dict[str, str]) -> dict[str, TaskScore]:
    scores = {}
    for task in names:
        raw = results["results"][task]
        metrics = {
            key.replace(",none", ""): float(value)
            for key, value in raw.items()
            if key.split(",")[0] in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr") and isinstance(value, float)
        }
        config = results.get("configs", {}).get(task, {})
        split = splits.get(task) or config.get("test_split") or config.get("validation_split") or "?"
        items = int(results["n-samples"][task]["effective"])
        scores[task] = TaskScore(task, metrics, items, split, sources.get(task, HUB))
    return scores


# lm-eval warns that a model object (not a name) was passed and that num_fewshot was set: both on purpose.
_EXPECTED_WARNINGS = ("lm_eval.models.huggingface", "lm_eval.evaluator")


@contextmanager
def _quiet(loggers: tuple[str, ...]) -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def unknown_tasks(names: list[str]) -> list[str]:
    """Names neither among the paper's tasks nor in lm-eval's registry (indexing it takes seconds)."""
    others = [name for name in names if name not in PAPER_TASKS]
    if not others:
        return []
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    return [name for name in others if name not in known]


def evaluate_zero_shot(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    data: Path | str,
    work_dir: Path,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
) -> ZeroShotResult:
    """Accuracy of `model` on `tasks`: the paper tasks from `data` (a folder) unless data == "hub";
    other task names always from lm-eval's registry. A paper task with no local data is skipped."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        return ZeroShotResult()
    local = [t for t in tasks if t in PAPER_TASKS] if data != HUB else []
    from_hub = [t for t in tasks if t not in local]
    if local:
        definitions = write_task_definitions(local, Path(data), work_dir / "lm_eval_tasks")
    else:
        definitions = TaskDefinitions(work_dir, {}, {}, {})
    runnable = [t for t in tasks if t not in definitions.skipped]
    result = ZeroShotResult(skipped=dict(definitions.skipped))
    for task, reason in definitions.skipped.items():
        log.warning("zero-shot task %s skipped: %s", task, reason)
    if not runnable:
        return result
    # The full registry takes seconds to index: only built when a task comes from the hub.
    manager = TaskManager(
        include_path=str(definitions.include_path) if local else None, include_defaults=bool(from_hub)
    )
    unknown = [t for t in runnable if t not in manager.all_tasks]  # also checked before a batch starts
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    model.eval()
    with _quiet(_EXPECTED_WARNINGS):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        results = simple_evaluate(
            model=lm,
            tasks=runnable,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=1000,
        )
    result.scores = _scores(results, runnable, definitions.splits, definitions.sources)
    return result
