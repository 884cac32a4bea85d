"""What a variant really gains over dense: parameters and loaded bytes counted by hand, the gain metrics
logged per pair, and the report's x dense columns with its note on zeros."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pruning_core.footprint import Footprint, footprint, gains
from tasks.evaluate import Evaluation, EvaluationSpec, evaluate_folder
from tasks.metrics import evaluation_metrics, gain_metrics
from tasks.review import DENSE, BatchReport, ReportRow, render
from tests.conftest import WIKITEXT_TEST

# vocab 64, hidden 16, MLP 32, 4 heads of 4 with 2 KV heads, 2 layers:
# per layer q 16x16 + k 8x16 + v 8x16 + o 16x16 + gate, up, down 3 x 16x32 + 2 norms of 16 = 2336;
# decoder 2 x 2336 + final norm 16 = 4688; one embedding table 64 x 16 = 1024.
DECODER, TABLE = 4688, 1024
ROTARY_BYTES = 2 * 2 * 4  # inv_freq and original_inv_freq: head_dim / 2 float32 each


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(("tied", "tables"), [(True, 1), (False, 2)])
def test_footprint_counts_decoder_and_embeddings_and_tied_weights_once(tied, tables):
    model = tiny_llama(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    measured = footprint(model)
    assert measured == Footprint(
        parameters=DECODER + tables * TABLE,
        decoder_parameters=DECODER,
        embedding_parameters=tables * TABLE,
        loaded_mib=((DECODER + tables * TABLE) * 4 + ROTARY_BYTES) / 2**20,
    )
    model.to(torch.bfloat16)  # loaded bytes follow the dtype; counts do not
    halved = footprint(model)
    assert halved.parameters == measured.parameters
    assert halved.loaded_mib == ((DECODER + tables * TABLE) * 2 + ROTARY_BYTES // 2) / 2**20


def test_zeros_leave_the_footprint_as_dense():
    model = tiny_llama(tied=False)
    dense = footprint(model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, ::2] = 0.0  # half the weights zero, tensors as large
    assert footprint(model) == dense


def test_gains_are_x_dense_in_the_direction_that_gains():
    variant = {"size_mib": 50.0, "params.total": 80.0, "decode_tok_s.b1": 30.0, "prefill_tok_s.b8": 5.0}
    dense = {"size_mib": 100.0, "params.total": 100.0, "decode_tok_s.b1": 20.0, "decode_ms_per_token.b1": 50.0}
    # sizes dense / variant, throughputs variant / dense; what dense lacks (prefill b8) or ms is left out
    assert gains(variant, dense) == {"size_mib": 2.0, "params.total": 1.25, "decode_tok_s.b1": 1.5}
    assert gains({"size_mib": float("nan")}, {"size_mib": 1.0}) == {}


def _evaluation(**fields) -> Evaluation:
    return Evaluation(perplexity={"wiki": 10.0}, tokens_scored={}, datasets={}, seq_len={}, seconds=1.0, **fields)


def test_pair_metrics_log_the_footprint_and_the_gains():
    small = Footprint(parameters=600, decoder_parameters=400, embedding_parameters=200, loaded_mib=2.0)
    dense_print = Footprint(parameters=1000, decoder_parameters=800, embedding_parameters=200, loaded_mib=4.0)
    variant = _evaluation(speed={"decode_tok_s.b1": 120.0}, footprint=small)
    dense = _evaluation(speed={"decode_tok_s.b1": 100.0}, footprint=dense_print)
    assert evaluation_metrics(dense, "dense_") == {
        "dense_ppl.wiki": 10.0,
        "dense_speed.decode_tok_s.b1": 100.0,
        "dense_params.total": 1000.0,
        "dense_params.decoder": 800.0,
        "dense_params.embeddings": 200.0,
        "dense_loaded_mib": 4.0,
    }
    assert gain_metrics(variant, dense, 3.0, 6.0) == pytest.approx(
        {"gain.size_mib": 2.0, "gain.decode_tok_s.b1": 1.2, "gain.params.total": 1000 / 600, "gain.loaded_mib": 2.0}
    )
    # an evaluation cached before footprints existed still validates, and logs no footprint
    old = Evaluation.model_validate_json(_evaluation().model_dump_json(exclude={"footprint"}))
    assert old.footprint is None and evaluation_metrics(old) == {"ppl.wiki": 10.0}


def test_evaluation_records_the_footprint_of_the_model_it_loaded(tiny_model_dir, tmp_path, monkeypatch):
    from infra.settings import Settings
    from pruning_core.modeling import load_for_compute

    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "home"))
    spec = EvaluationSpec(perplexity=[str(WIKITEXT_TEST)], seq_len=64, max_tokens=128, generation_tokens=0)
    evaluation = evaluate_folder(str(tiny_model_dir), spec, Settings())
    model, _ = load_for_compute(str(tiny_model_dir), "cpu")
    assert evaluation.footprint == footprint(model)
    assert evaluation.footprint.embedding_parameters == 2 * 256 * 64  # the tiny llama's untied tables


def _row(recipe: str, method: str, **fields) -> ReportRow:
    return ReportRow(model="m", recipe=recipe, method=method, perplexity={"wiki": 10.0}, **fields)


def test_report_shows_footprint_and_gains_and_says_zeros_gain_nothing():
    report = BatchReport(
        batch="b",
        run_id="r",
        rows=[
            _row(DENSE, DENSE, size_mib=100.0, parameters=2.5e6, loaded_mib=200.0, speed={"decode_tok_s.b1": 50.0}),
            _row(
                "w50",
                "wanda",
                sparsity=0.5,
                size_mib=100.0,
                parameters=2.5e6,
                loaded_mib=200.0,
                speed={"decode_tok_s.b1": 49.0},
                gain={"size_mib": 1.0, "decode_tok_s.b1": 0.98, "loaded_mib": 1.0},
            ),
            _row(
                "lp",
                "llm_pruner",
                sparsity=0.2,
                size_mib=80.0,
                parameters=2e6,
                loaded_mib=160.0,
                speed={"decode_tok_s.b1": 60.0},
                gain={"size_mib": 1.25, "decode_tok_s.b1": 1.2, "loaded_mib": 1.25},
            ),
        ],
    )
    rows = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    columns = ["size MiB", "params M", "loaded MiB", "decode tok/s b1", "x dense size", "x dense decode b1"]
    assert [[row[c] for c in columns] for row in rows] == [
        ["100.0", "2.50", "200.0", "50.0", "", ""],  # dense: its absolute numbers, no gain over itself
        ["100.0", "2.50", "200.0", "49.0", "1.00", "0.98"],
        ["80.0", "2.00", "160.0", "60.0", "1.25", "1.20"],
    ]
    table = render(report)
    assert "wanda: zeros gain no speed or size with the runtimes in use today" in table
    assert "vLLM removed its 2:4 sparse support" in table and "torchao deleted its sparsity package" in table
    structured_only = report.model_copy(update={"rows": [report.rows[0], report.rows[2]]})
    assert "zeros gain no speed" not in render(structured_only)
