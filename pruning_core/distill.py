"""Recovery by knowledge distillation from the dense model (Minitron, arXiv 2408.11796): the pruned student
learns the teacher's next-token distribution (KL on temperature-softened logits), optionally its final
hidden states, training every remaining weight or LoRA adapters.

A token budget sets the steps (tokens / (batch_size x seq_len)); the learning rate follows a warm-up then a
cosine, linear or constant schedule computed from the step alone, so nothing but the weights, the optimizer
moments and the curves needs saving. Batches are drawn from the text's head, seeded by (seed, step); the
tail (`heldout_tokens`) is never trained on and gives the held-out perplexity curve. A run resumed from the
state saved after step t continues exactly as an uninterrupted one (as LoRA recovery does).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from torch import nn
from tqdm.auto import tqdm

from pruning_core.adapters import adapter_for
from pruning_core.logit_distillation import (
    LossWeights,
    chunked_logit_loss,
    final_hidden_states,
    plain_output_layer,
)
from pruning_core.recovery import (
    ALL_PROJECTIONS,
    RecoveryResult,
    TrainingState,
    optimizer_step,
    resumed,
    step_batch,
    training_state,
)

Schedule = Literal["cosine", "linear", "constant"]


class DistillSpec(BaseModel):
    """Distillation from the dense model after structured pruning (`kind: distill`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["distill"]
    data: str = Field(min_length=1, description="data spec of the training text (file, jsonl:PATH:FIELD, hf://)")
    tokens: int = Field(ge=1, le=10**12, description="training token budget (steps = tokens / batch tokens)")
    batch_size: int = Field(default=4, ge=1, le=4096)
    seq_len: int = Field(default=256, ge=8, le=131072)
    learning_rate: float = Field(default=2e-4, gt=0.0, le=1.0)
    schedule: Schedule = Field(default="cosine", description="after warm-up: cosine | linear (to 0) | constant")
    warmup: float = Field(default=0.05, ge=0.0, lt=1.0, description="fraction of the steps warming up linearly")
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    temperature: float = Field(default=1.0, gt=0.0, le=100.0, description="softens both distributions in the KL")
    hidden_weight: float = Field(default=0.0, ge=0.0, description="weight of the final hidden-state MSE")
    lm_weight: float = Field(default=0.0, ge=0.0, description="weight of next-token cross-entropy on the text")
    train: Literal["all", "lora"] = Field(default="all", description="all remaining weights | LoRA adapters")
    precision: Literal["float32", "bfloat16", "auto"] = Field(
        default="float32",
        description="forward passes in float32, or under bfloat16 autocast (weights and optimizer stay float32): "
        "1.5x the tokens per second on 2 AMX CPU cores, more on GPUs, but 2.4x slower on AVX-512 cores without "
        "bfloat16 instructions; auto: bfloat16 where the device computes it natively (`native_bfloat16`)",
    )
    embeddings: Literal["train", "freeze"] = Field(
        default="train",
        description="train all: train the token embeddings and output layer too, or freeze them (pruning leaves them "
        "whole; freezing saves the output layer's weight gradient and its optimizer state, the larger part of a "
        "large-vocabulary model's step)",
    )
    compile: bool = Field(
        default=False,
        description="compile every decoder block of student and teacher (torch.compile; the blocks share one "
        "graph) and the loss's elementwise terms, and step with fused AdamW: on 2 AMX CPU cores about 1.6x the "
        "steps per second of SmolLM2-135M after about 45 s of compiling, which the run pays once; needs a C++ "
        "compiler on CPUs",
    )
    r: int = Field(default=8, ge=1, le=1024, description="train lora: adapter rank")
    alpha: float = Field(default=16.0, gt=0.0, description="train lora: adapter alpha")
    heldout_tokens: int = Field(default=8192, ge=0, description="tail of the text kept for held-out perplexity")
    eval_every: int = Field(default=25, ge=1, description="steps between held-out perplexity measurements")
    seed: int = Field(default=0, ge=0)

    @field_validator("data")
    @classmethod
    def _data_exists(cls, value: str) -> str:
        from pruning_core.data import check_data_spec

        return check_data_spec(value)

    @model_validator(mode="after")
    def _embeddings_need_all(self) -> DistillSpec:
        if self.embeddings == "freeze" and self.train != "all":
            raise ValueError("embeddings: freeze applies to train: all (LoRA adapters never touch the embeddings)")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        data = handler(self)
        if self.embeddings == "train":  # added later: recipes written before it keep their fingerprints
            data.pop("embeddings", None)
        if not self.compile:
            data.pop("compile", None)
        return data

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))

    def learning_rate_at(self, step: int) -> float:
        warmup = round(self.warmup * self.steps)
        if step < warmup:
            return self.learning_rate * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        if self.schedule == "cosine":
            return self.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))
        if self.schedule == "linear":
            return self.learning_rate * (1 - progress)
        return self.learning_rate


@cache
def native_bfloat16(device: str) -> bool:
    """Whether `device` multiplies bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with AMX or
    AVX-512 BF16 (without them oneDNN emulates bfloat16: 195 s against float32's 83 s for the same 6 steps of
    SmolLM2-135M on 2 AVX-512 cores)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell, so the safe choice
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolved_precision(precision: str, device: str) -> str:
    """What `precision` runs as on `device`: auto becomes bfloat16 where it is native, float32 elsewhere."""
    if precision == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return precision


def autocast_bfloat16(spec: DistillSpec, device: str) -> bool:
    return resolved_precision(spec.precision, device) == "bfloat16"


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x KL(teacher || student) of the softened next-token distributions, averaged over tokens."""
    vocab = student.shape[-1]
    log_student = F.log_softmax(student.float().reshape(-1, vocab) / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float().reshape(-1, vocab) / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")


def split_heldout(tokens: torch.Tensor, spec: DistillSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(training stream, held-out tail); the tail is whole windows of `seq_len`."""
    windows = spec.heldout_tokens // spec.seq_len
    cut = len(tokens) - windows * spec.seq_len
    if cut <= spec.seq_len:
        raise ValueError(
            f"distillation data has {len(tokens)} tokens: too few for {spec.heldout_tokens} held out and training "
            f"windows of {spec.seq_len}"
        )
    return tokens[:cut], tokens[cut:]


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # compiled blocks in eval mode, at its batch size, would compile anew
def heldout_perplexity(model: nn.Module, heldout: torch.Tensor, seq_len: int, device: str) -> float:
    windows = heldout[: len(heldout) // seq_len * seq_len].reshape(-1, seq_len)
    total = 0.0
    was_training = model.training
    model.eval()
    for start in range(0, len(windows), 4):
        batch = windows[start : start + 4].to(device)
        total += model(input_ids=batch, labels=batch, use_cache=False).loss.item() * len(batch)
    model.train(was_training)
    return math.exp(total / len(windows))


def _student(model: nn.Module, spec: DistillSpec, device: str) -> nn.Module:
    if spec.train == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        if spec.embeddings == "freeze":
            for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
                if layer is not None:
                    layer.weight.requires_grad_(False)
        return model.to(device)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(spec.seed)  # the adapters' initial A matrices
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        target_modules=list(ALL_PROJECTIONS),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config).to(device)


@contextlib.contextmanager
def compiled_blocks(models: list[nn.Module], enabled: bool) -> Iterator[None]:
    """Every decoder block of `models` compiled inside the context, eager again after it (the teacher is the
    caller's, and the student is saved and evaluated afterwards)."""
    blocks = [block for model in models for block in adapter_for(model).blocks(model)] if enabled else []
    for block in blocks:
        block.compile(dynamic=False)
    try:
        yield
    finally:
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under a LoRA wrapper (its layers carry the adapters in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _step_loss(student: nn.Module, teacher: nn.Module, batch: torch.Tensor, spec: DistillSpec) -> torch.Tensor:
    """The step's loss; from final hidden states in chunks (`logit_distillation`) where both models' logits are
    their output layer's and nothing more, else from whole logits."""
    bfloat16 = autocast_bfloat16(spec, str(batch.device))
    student_lm = _causal_lm(student)
    student_head, teacher_head = plain_output_layer(student_lm), plain_output_layer(teacher)
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bfloat16):
        if student_head is None or teacher_head is None:
            return _whole_logits_loss(student, teacher, batch, spec)
        with torch.no_grad():
            taught = final_hidden_states(teacher, batch)
        learned = final_hidden_states(student_lm, batch)
    labels = F.pad(batch[:, 1:], (0, 1), value=-100).reshape(-1) if spec.lm_weight > 0 else None
    loss = chunked_logit_loss(
        student_hidden=learned.reshape(-1, learned.shape[-1]),
        output_weight=student_head.weight,
        teacher_hidden=taught.reshape(-1, taught.shape[-1]),
        teacher_output_weight=teacher_head.weight,
        weights=LossWeights(temperature=spec.temperature, lm_weight=spec.lm_weight),
        labels=labels,
        compute_dtype=torch.bfloat16 if bfloat16 else torch.float32,
        compiled=spec.compile,
    )
    if spec.hidden_weight > 0:
        loss = loss + spec.hidden_weight * _hidden_error(learned, taught)
    return loss


def _hidden_error(learned: torch.Tensor, taught: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the final hidden states relative to the teacher's mean square."""
    target = taught.float()
    return (learned.float() - target).square().mean() / target.square().mean().clamp_min(1e-12)


def _whole_logits_loss(student: nn.Module, teacher: nn.Module, batch: torch.Tensor, spec: DistillSpec) -> torch.Tensor:
    wants_hidden = spec.hidden_weight > 0
    labels = batch if spec.lm_weight > 0 else None
    with torch.no_grad():
        taught = teacher(input_ids=batch, use_cache=False, output_hidden_states=wants_hidden)
    learned = student(input_ids=batch, labels=labels, use_cache=False, output_hidden_states=wants_hidden)
    loss = distillation_loss(learned.logits, taught.logits, spec.temperature)
    if spec.lm_weight > 0:
        loss = loss + spec.lm_weight * learned.loss
    if wants_hidden:
        loss = loss + spec.hidden_weight * _hidden_error(learned.hidden_states[-1], taught.hidden_states[-1])
    return loss


def distill(
    model: nn.Module,
    teacher: nn.Module,
    tokens: torch.Tensor,
    spec: DistillSpec,
    device: str = "cpu",
    progress: bool = True,
    start: TrainingState | None = None,
    on_checkpoint: Callable[[TrainingState], None] | None = None,
    checkpoint_every: int = 25,
) -> tuple[nn.Module, RecoveryResult]:
    """Distil `teacher` into `model` on `tokens` (a 1-D stream) for `spec.steps` steps; return the student.

    The returned model is a plain transformers model (LoRA adapters merged) on the CPU in eval mode;
    `result.heldout` maps steps to held-out perplexity (step 0: before training).
    """
    started = time.perf_counter()
    train_tokens, heldout = split_heldout(tokens, spec)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = _student(model, spec, device)
    trainable = {name: p for name, p in student.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(
        trainable.values(),
        lr=spec.learning_rate,
        weight_decay=spec.weight_decay,
        fused=spec.compile or None,  # one kernel over all tensors: 0.27 -> 0.09 s a SmolLM2 step on 2 CPU cores
    )
    result = resumed(trainable, optimizer, start)
    first = result.resumed_from_step
    if start is None and len(heldout):
        result.heldout[0] = heldout_perplexity(student, heldout, spec.seq_len, device)
    student.train()
    bar = tqdm(range(first, spec.steps), desc="distillation", disable=not progress)
    with compiled_blocks([_causal_lm(student), teacher], spec.compile):
        for step in bar:
            torch.manual_seed(spec.seed * 1_000_003 + step)  # any dropout the model has
            for group in optimizer.param_groups:
                group["lr"] = spec.learning_rate_at(step)
            batch = step_batch(train_tokens, spec, step).to(device)
            loss = _step_loss(student, teacher, batch, spec)
            value = optimizer_step(
                loss=loss, trainable=trainable, optimizer=optimizer, result=result, step=step, what="distillation"
            )
            bar.set_postfix(loss=f"{value:.3f}")
            done = step + 1
            if len(heldout) and (done % spec.eval_every == 0 or done == spec.steps):
                result.heldout[done] = heldout_perplexity(student, heldout, spec.seq_len, device)
            if on_checkpoint is not None and done % checkpoint_every == 0 and done < spec.steps:
                on_checkpoint(training_state(done, result, trainable, optimizer))
    trained = student.merge_and_unload() if spec.train == "lora" else student
    for p in trained.parameters():
        p.requires_grad_(True)
    result.seconds = time.perf_counter() - started
    result.precision = resolved_precision(spec.precision, device)
    return trained.to("cpu").eval(), result
