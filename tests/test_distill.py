"""Distillation from the dense model after structured pruning: the loss, the schedule, resume, the gain."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pruning_core.data import read_rows, tokenize_text
from pruning_core.distill import DistillSpec, distill, distillation_loss, split_heldout
from pruning_core.job import recover_to_folder
from pruning_core.perplexity import perplexity
from pruning_core.recipe import Recipe
from pruning_core.recovery import TrainingState
from pruning_core.structured.llm_pruner import StructuredSettings, prune_structured
from tests.conftest import WIKITEXT_TEST, WIKITEXT_VALID, tiny_model

SPEC = {"kind": "distill", "data": str(WIKITEXT_VALID), "batch_size": 4, "seq_len": 64, "heldout_tokens": 2048}


def _pruned(trained_tiny, ratio: float = 0.3):
    model = tiny_model("llama")
    model.load_state_dict(trained_tiny[0].state_dict())
    prune_structured(model, trained_tiny[1][:2048].reshape(-1, 64)[:8], StructuredSettings(ratio=ratio), progress=False)
    return model


def test_the_loss_is_the_temperature_scaled_kl_divergence_of_teacher_and_student():
    student, teacher = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    t = 2.0
    p = torch.softmax(teacher / t, -1)
    expected = t**2 * (p * (torch.log(p) - torch.log_softmax(student / t, -1))).sum(-1).mean()
    assert distillation_loss(student, teacher, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)


def test_the_schedule_warms_up_then_decays_to_zero_and_the_budget_sets_the_steps():
    spec = DistillSpec(**SPEC, tokens=4 * 64 * 100, learning_rate=1e-3, warmup=0.1)
    assert spec.steps == 100
    rates = [spec.learning_rate_at(step) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert max(rates) == pytest.approx(1e-3) and rates[-1] < 1e-5
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    constant = spec.model_copy(update={"schedule": "constant", "warmup": 0.0})
    assert {constant.learning_rate_at(s) for s in range(100)} == {1e-3}


def test_recipes_take_distillation_or_lora_recovery_and_lora_keeps_its_fingerprint():
    distilled = Recipe(method="depth", ratio=0.3, recovery={**SPEC, "tokens": 1000})
    assert isinstance(distilled.recovery, DistillSpec)
    lora = {"data": str(WIKITEXT_VALID), "steps": 5}
    old = Recipe(method="llm_pruner", ratio=0.2, recovery=lora)
    assert '"kind"' not in old.canonical_json()  # recipes from before distillation keep their keys
    assert Recipe(method="llm_pruner", ratio=0.2, recovery={**lora, "kind": "lora"}) == old
    with pytest.raises(ValueError, match="tokens"):
        Recipe(method="depth", ratio=0.3, recovery=SPEC)


def test_heldout_tail_is_never_trained_on():
    tokens = torch.arange(10_000)
    spec = DistillSpec(**SPEC, tokens=1000)
    train, heldout = split_heldout(tokens, spec)
    assert len(heldout) == 2048 and torch.equal(torch.cat([train, heldout]), tokens)
    with pytest.raises(ValueError, match="too few"):
        split_heldout(torch.arange(2100), spec)


@pytest.mark.parametrize("train", ["all", "lora"])
def test_distillation_lowers_the_heldout_loss_of_a_pruned_model(trained_tiny, tiny_tokenizer, tmp_path, train):
    teacher = trained_tiny[0]
    test_ids = tokenize_text(tiny_tokenizer, read_rows(str(WIKITEXT_TEST))[:400])[:8192]
    dense = perplexity(teacher, test_ids, 64, progress=False).perplexity
    model = _pruned(trained_tiny)
    before = perplexity(model, test_ids, 64, progress=False).perplexity
    lr = 2e-3 if train == "all" else 5e-3
    spec = DistillSpec(**SPEC, tokens=4 * 64 * 40, learning_rate=lr, eval_every=10, train=train)
    rows = read_rows(str(WIKITEXT_VALID))[:3000]
    student, result = recover_to_folder(model, tiny_tokenizer, rows, spec, tmp_path, progress=False, teacher=teacher)
    after = perplexity(student, test_ids, 64, progress=False).perplexity
    assert dense < before and after - dense < 0.5 * (before - dense), (dense, before, after)  # half the gap closed
    assert sorted(result.heldout) == [0, 10, 20, 30, 40] and result.heldout[40] < result.heldout[0]
    assert all(math.isfinite(v) for v in result.losses) and len(result.losses) == 40
    assert not [name for name, _ in student.named_modules() if "lora" in name.lower()]
    assert type(student).__name__ == "LlamaForCausalLM" and list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("train", ["all", "lora"])
def test_a_distillation_killed_mid_way_resumes_to_the_same_weights(trained_tiny, train):
    teacher, tokens = trained_tiny
    precision = "bfloat16" if train == "all" else "float32"
    spec = DistillSpec(
        **SPEC, tokens=4 * 64 * 6, learning_rate=1e-3, eval_every=2, hidden_weight=0.5, train=train, precision=precision
    )
    straight, straight_result = distill(_pruned(trained_tiny), teacher, tokens, spec, progress=False)
    saved: list[TrainingState] = []
    distill(
        _pruned(trained_tiny), teacher, tokens, spec, progress=False, on_checkpoint=saved.append, checkpoint_every=4
    )
    assert [s.step for s in saved] == [4] and sorted(saved[0].heldout) == [0, 2, 4]
    resumed, result = distill(_pruned(trained_tiny), teacher, tokens, spec, progress=False, start=saved[0])
    assert result.resumed_from_step == 4 and result.losses == straight_result.losses
    assert result.heldout == straight_result.heldout
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_distillation_without_a_teacher_is_refused(trained_tiny, tiny_tokenizer, tmp_path):
    spec = DistillSpec(**SPEC, tokens=256)
    with pytest.raises(ValueError, match="teacher"):
        recover_to_folder(_pruned(trained_tiny), tiny_tokenizer, ["text"], spec, tmp_path, progress=False)


def test_frozen_embeddings_stay_exactly_as_pruned_while_the_rest_trains(trained_tiny):
    teacher, tokens = trained_tiny
    spec = DistillSpec(**SPEC, tokens=4 * 64 * 3, learning_rate=1e-3, embeddings="freeze")
    pruned = _pruned(trained_tiny)
    before = {name: tensor.clone() for name, tensor in pruned.state_dict().items()}
    student, _ = distill(pruned, teacher, tokens, spec, progress=False)
    after = student.state_dict()
    frozen = {"model.embed_tokens.weight", "lm_head.weight"} & set(after)
    assert frozen and all(torch.equal(after[name], before[name]) for name in frozen)
    assert not torch.equal(after["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"])
    assert all(p.requires_grad for p in student.parameters())  # handed back ready for any later training
    # The option came later: a spec at the default keeps the fingerprint it had before.
    assert "embeddings" not in DistillSpec(**SPEC, tokens=256).model_dump()
    assert DistillSpec(**SPEC, tokens=256, embeddings="freeze").model_dump()["embeddings"] == "freeze"
    with pytest.raises(ValueError, match="train: all"):
        DistillSpec(**SPEC, tokens=256, embeddings="freeze", train="lora")


def test_auto_precision_trains_as_the_precision_the_device_computes_natively(trained_tiny, monkeypatch):
    from pruning_core import distill as distill_module

    teacher, tokens = trained_tiny
    spec = DistillSpec(**SPEC, tokens=4 * 64 * 2, learning_rate=1e-3, precision="auto")
    flags = open("/proc/cpuinfo").read().split()
    native = "amx_bf16" in flags or "avx512_bf16" in flags
    assert distill_module.native_bfloat16("cpu") is native
    explicit = spec.model_copy(update={"precision": "bfloat16" if native else "float32"})
    other = spec.model_copy(update={"precision": "float32" if native else "bfloat16"})
    auto, _ = distill(_pruned(trained_tiny), teacher, tokens, spec, progress=False)
    same, _ = distill(_pruned(trained_tiny), teacher, tokens, explicit, progress=False)
    different, _ = distill(_pruned(trained_tiny), teacher, tokens, other, progress=False)
    weights = auto.state_dict()
    assert all(torch.equal(weights[name], tensor) for name, tensor in same.state_dict().items())
    assert not all(torch.equal(weights[name], tensor) for name, tensor in different.state_dict().items())
    monkeypatch.setattr(distill_module, "native_bfloat16", lambda device: True)  # a machine with AMX
    assert distill_module.autocast_bfloat16(spec, "cpu")
    assert not distill_module.autocast_bfloat16(spec.model_copy(update={"precision": "float32"}), "cpu")


@pytest.mark.parametrize(
    ("temperature", "lm_weight", "compiled"),
    [(1.0, 0.0, False), (2.0, 0.5, False), (1.0, 0.7, False), (2.0, 0.5, True)],
)
def test_the_chunked_loss_and_its_gradients_are_those_of_whole_logits(temperature, lm_weight, compiled, monkeypatch):
    from pruning_core import logit_distillation
    from pruning_core.logit_distillation import LossWeights, chunked_logit_loss

    monkeypatch.setattr(logit_distillation, "CHUNK_TOKENS", 64)  # several chunks, the last one short
    generator = torch.Generator().manual_seed(0)
    tokens, hidden, vocab = 300, 16, 50
    student = torch.randn(tokens, hidden, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(tokens, hidden, dtype=torch.float64, generator=generator)
    teacher_weight = torch.randn(vocab, hidden, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[::7] = -100
    logits = student @ weight.T
    expected = distillation_loss(logits, teacher @ teacher_weight.T, temperature)
    expected = expected + lm_weight * torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    expected_grads = torch.autograd.grad(expected, (student, weight))
    loss = chunked_logit_loss(
        student_hidden=student,
        output_weight=weight,
        teacher_hidden=teacher,
        teacher_output_weight=teacher_weight,
        weights=LossWeights(temperature=temperature, lm_weight=lm_weight),
        labels=labels,
        compute_dtype=torch.float64,
        compiled=compiled,
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(torch.autograd.grad(loss, (student, weight)), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_a_step_from_hidden_states_matches_the_step_from_whole_logits(trained_tiny):
    from pruning_core.distill import _step_loss, _whole_logits_loss

    teacher, tokens = trained_tiny
    spec = DistillSpec(**SPEC, tokens=256, temperature=2.0, lm_weight=0.3, hidden_weight=0.5)
    batch = tokens[:256].reshape(4, 64)
    losses, grads = [], []
    for loss_of in (_step_loss, _whole_logits_loss):
        student = _pruned(trained_tiny)
        loss = loss_of(student, teacher, batch, spec)
        loss.backward()
        losses.append(loss.item())
        grads.append({name: p.grad.clone() for name, p in student.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_logits_that_are_more_than_the_output_layer_go_through_the_whole_logits_loss(trained_tiny):
    from pruning_core.logit_distillation import plain_output_layer

    model = trained_tiny[0]
    assert plain_output_layer(model) is model.get_output_embeddings()
    model.config.final_logit_softcapping = 30.0  # Gemma 2 caps its logits: the chunked loss would miss that
    try:
        assert plain_output_layer(model) is None
    finally:
        del model.config.final_logit_softcapping


def test_compiled_blocks_train_as_eager_ones_resume_exactly_and_are_eager_again_afterwards(trained_tiny, monkeypatch):
    from torch._dynamo.utils import counters

    from pruning_core import distill as distill_module
    from pruning_core.distill import heldout_perplexity

    teacher, tokens = trained_tiny
    spec = DistillSpec(**SPEC, tokens=4 * 64 * 4, learning_rate=1e-3, eval_every=2)
    compiled_spec = spec.model_copy(update={"compile": True})
    eager, eager_result = distill(_pruned(trained_tiny), teacher, tokens, spec, progress=False)
    graphs_compiled_by_heldout_passes = []

    def watched(*args, **kwargs):
        before = counters["stats"]["unique_graphs"]
        value = heldout_perplexity(*args, **kwargs)
        graphs_compiled_by_heldout_passes.append(counters["stats"]["unique_graphs"] - before)
        return value

    monkeypatch.setattr(distill_module, "heldout_perplexity", watched)
    saved: list[TrainingState] = []
    compiled, result = distill(
        _pruned(trained_tiny),
        teacher,
        tokens,
        compiled_spec,
        progress=False,
        on_checkpoint=saved.append,
        checkpoint_every=2,
    )
    # fused kernels round differently, nothing more
    assert result.losses == pytest.approx(eager_result.losses, rel=1e-3)
    for name, tensor in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], tensor, rtol=1e-3, atol=1e-4)
    blocks = [*compiled.model.layers, *teacher.model.layers]
    assert all(block._compiled_call_impl is None for block in blocks)  # saved and evaluated eager
    # held-out passes run eager: compiled, eval mode at their own batch size would compile graphs of their own
    assert len(graphs_compiled_by_heldout_passes) == 3 and not any(graphs_compiled_by_heldout_passes)
    resumed, resumed_result = distill(
        _pruned(trained_tiny), teacher, tokens, compiled_spec, progress=False, start=saved[0]
    )
    assert resumed_result.losses == result.losses
    for name, tensor in compiled.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    # The option came later: a spec without it keeps the fingerprint it had before.
    assert "compile" not in spec.model_dump() and compiled_spec.model_dump()["compile"] is True
