"""Data specs, calibration sampling and the perplexity protocol."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from pruning_core.data import DataSpecError, calibration_windows, join_rows, read_rows, tokenize_text
from pruning_core.perplexity import perplexity
from tests.conftest import SHARED_DATA, WIKITEXT_TEST, tiny_model


def test_text_file_rows_keep_newlines_and_drop_doc_tags(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text('<doc id="1" title="x">\n = Title = \n\nBody line.\n</doc>\n')
    assert read_rows(str(path)) == [" = Title = \n", "\n", "Body line.\n"]
    assert join_rows(["a\n", "b\n"]) == "a\n\n\nb\n"


def test_wikitext_rows_are_the_standard_file():
    rows = read_rows(str(WIKITEXT_TEST))
    assert len(rows) == 4358
    assert rows[1] == " = Robert Boulter = \n"


def test_jsonl_plain_and_gzip(tmp_path):
    plain = tmp_path / "d.jsonl"
    plain.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_rows(f"jsonl:{plain}:text") == ["one", "two"]
    c4 = SHARED_DATA / "c4" / "c4-sample.01.json.gz"
    rows = read_rows(f"jsonl:{c4}:text")
    with gzip.open(c4, "rt") as handle:
        assert len(rows) == sum(1 for line in handle if line.strip()) == 10
    with pytest.raises(DataSpecError, match="no field 'body'"):
        read_rows(f"jsonl:{plain}:body")


def test_bad_specs_fail_with_one_clear_message(tmp_path):
    with pytest.raises(DataSpecError, match="data file not found"):
        read_rows(str(tmp_path / "nope.txt"))
    with pytest.raises(DataSpecError, match="jsonl:PATH:FIELD"):
        read_rows("jsonl:nofield")
    with pytest.raises(DataSpecError, match="hf://dataset"):
        read_rows("hf://only-a-name")


def test_calibration_windows_are_seeded_and_in_range():
    ids = torch.arange(1000)
    first = calibration_windows(ids, 8, 64, seed=0)
    assert first.shape == (8, 64)
    assert torch.equal(first, calibration_windows(ids, 8, 64, seed=0))
    assert not torch.equal(first, calibration_windows(ids, 8, 64, seed=1))
    assert torch.all(first[:, 1:] - first[:, :-1] == 1), "windows are contiguous text"
    with pytest.raises(DataSpecError, match="need more than seq_len"):
        calibration_windows(torch.arange(10), 1, 64, 0)


def test_perplexity_matches_a_manual_computation(tiny_tokenizer):
    model = tiny_model("llama")
    ids = tokenize_text(tiny_tokenizer, read_rows(str(WIKITEXT_TEST))[:60])
    result = perplexity(model, ids, seq_len=32, max_tokens=200, progress=False)
    assert result.windows == 6 and result.tokens_scored == 192 and result.tokens_available == ids.numel()
    total = 0.0
    with torch.no_grad():
        for w in range(6):
            window = ids[w * 32 : (w + 1) * 32]
            logits = model(window[None]).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum"))
    assert result.perplexity == pytest.approx(math.exp(total / (6 * 31)), rel=1e-5)
    # a random model over 256 tokens is close to uniform
    assert 100 < result.perplexity < 600
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, ids[:10], seq_len=32, progress=False)
