"""Recovery after structured pruning by LoRA on next-token loss, merged back into the weights (the other
recovery, distillation from the dense model, is `pruning_core.distill`).

Training is deterministic and resumable: the batch of step t is drawn with a generator seeded by
(seed, t) and dropout is reseeded every step, so a run resumed from the state saved after step t
(adapter weights, optimizer moments, losses) continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from pruning_core.adapters import LLAMA_PROJECTIONS

if TYPE_CHECKING:
    from pruning_core.distill import DistillSpec

ALL_PROJECTIONS = LLAMA_PROJECTIONS.leaves


class RecoverySpec(BaseModel):
    """LoRA fine-tuning after structured pruning (defaults: LLM-Pruner's r=8, alpha=16, dropout 0.05)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Left out of dumps: LoRA recoveries predate `kind`, their recipes keep their fingerprints.
    kind: Literal["lora"] = Field(default="lora", exclude=True)
    data: str = Field(min_length=1, description="data spec of the training text (file, jsonl:PATH:FIELD, hf://)")
    steps: int = Field(ge=1, le=1_000_000)
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    batch_size: int = Field(default=4, ge=1, le=4096)
    seq_len: int = Field(default=128, ge=8, le=131072)
    r: int = Field(default=8, ge=1, le=1024)
    alpha: float = Field(default=16.0, gt=0.0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    seed: int = Field(default=0, ge=0)

    @field_validator("data")
    @classmethod
    def _data_exists(cls, value: str) -> str:
        from pruning_core.data import check_data_spec

        return check_data_spec(value)


@dataclass
class TrainingState:
    """Everything a resumed recovery needs after `step` steps."""

    step: int
    losses: list[float]
    adapter: dict[str, torch.Tensor]  # the trained tensors: LoRA adapters, or every weight when distilling all
    optimizer: dict[str, torch.Tensor]
    optimizer_groups: list[dict]
    heldout: dict[int, float] = field(default_factory=dict)  # step -> held-out perplexity (distillation)


@dataclass
class RecoveryResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_step: int = 0
    heldout: dict[int, float] = field(default_factory=dict)  # step -> held-out perplexity (distillation)
    precision: str = "float32"  # what the forward passes ran in (distillation's `auto` resolved on the device)


def step_batch(tokens: torch.Tensor, spec: RecoverySpec | DistillSpec, step: int) -> torch.Tensor:
    """The training windows of step `step` (batch_size x seq_len), the same on every run."""
    if len(tokens) <= spec.seq_len:
        raise ValueError(f"recovery data has {len(tokens)} tokens, fewer than one window of {spec.seq_len}")
    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - spec.seq_len, (spec.batch_size,), generator=generator)
    return torch.stack([tokens[s : s + spec.seq_len] for s in starts.tolist()])


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": torch.as_tensor(value).detach().cpu().clone()
        for index, values in state["state"].items()
        for key, value in values.items()
    }
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, groups


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    restored = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    optimizer.load_state_dict({"state": state, "param_groups": restored})


def resumed(
    trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, start: TrainingState | None
) -> RecoveryResult:
    """The result so far: empty, or `start`'s after its weights and optimizer moments are put back."""
    result = RecoveryResult()
    if start is None:
        return result
    missing = trainable.keys() - start.adapter.keys()
    if missing:
        raise ValueError(f"recovery checkpoint lacks trained weights, e.g. {sorted(missing)[0]}")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(start.adapter[name])
    restore_optimizer(optimizer, start.optimizer, start.optimizer_groups)
    result.losses, result.resumed_from_step, result.heldout = list(start.losses), start.step, dict(start.heldout)
    return result


def optimizer_step(
    *,
    loss: torch.Tensor,
    trainable: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    result: RecoveryResult,
    step: int,
    what: str,
) -> float:
    """One clipped optimizer step on `loss`, recorded in `result.losses`; a non-finite loss stops the run."""
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} loss is {value} at step {step}; lower learning_rate")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable.values(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    result.losses.append(value)
    return value


def training_state(
    done: int, result: RecoveryResult, trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer
) -> TrainingState:
    """What a resumed run needs after `done` steps (copied to the CPU)."""
    tensors, groups = optimizer_tensors(optimizer)
    weights = {name: p.detach().cpu().clone() for name, p in trainable.items()}
    return TrainingState(done, list(result.losses), weights, tensors, groups, dict(result.heldout))


def recover(
    model: nn.Module,
    tokens: torch.Tensor,
    spec: RecoverySpec,
    device: str = "cpu",
    progress: bool = True,
    start: TrainingState | None = None,
    on_checkpoint: Callable[[TrainingState], None] | None = None,
    checkpoint_every: int = 25,
) -> tuple[nn.Module, RecoveryResult]:
    """Train LoRA adapters on `tokens` (a 1-D token stream) for `spec.steps` steps, merge them, return the model.

    The returned model is a plain transformers model (no adapter modules) on the CPU in eval mode.
    """
    from peft import LoraConfig, get_peft_model

    started = time.perf_counter()
    torch.manual_seed(spec.seed)  # the adapters' initial A matrices
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config).to(device)
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=spec.learning_rate, weight_decay=0.0)
    result = resumed(trainable, optimizer, start)
    first = result.resumed_from_step
    peft_model.train()
    bar = tqdm(range(first, spec.steps), desc="LoRA recovery", disable=not progress)
    for step in bar:
        torch.manual_seed(spec.seed * 1_000_003 + step)  # LoRA dropout
        batch = step_batch(tokens, spec, step).to(device)
        loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        value = optimizer_step(
            loss=loss, trainable=trainable, optimizer=optimizer, result=result, step=step, what="recovery"
        )
        bar.set_postfix(loss=f"{value:.3f}")
        done = step + 1
        if on_checkpoint is not None and done % checkpoint_every == 0 and done < spec.steps:
            on_checkpoint(training_state(done, result, trainable, optimizer))
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    result.seconds = time.perf_counter() - started
    return merged.to("cpu").eval(), result
