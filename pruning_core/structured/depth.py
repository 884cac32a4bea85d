"""Depth pruning: remove whole decoder blocks, the least important measured on the calibration set.

Two measures of a block's importance (`depth_importance`):
- `loss`: the calibration loss with the block skipped (its output replaced by its input) minus the loss
  of the whole model; one forward pass per block.
- `influence`: ShortGPT's block influence, 1 - cos(block input, block output) averaged over the tokens;
  one forward pass in all.

The blocks are removed in one shot; the config keeps fewer layers and its per-layer lists (`layer_types`,
the sliding-window layers they imply) are cut to the blocks kept, so a stock `from_pretrained` loads it.
`ratio` counts as for width pruning: blocks removed = ratio x counted parameters / one block's parameters.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from pruning_core.adapters import adapter_for
from pruning_core.method_settings import MethodSettings
from pruning_core.structured.llm_pruner import (
    RatioOf,
    StructuredPruningError,
    counted_parameters,
    parameter_count,
)

DepthImportance = Literal["loss", "influence"]
PER_LAYER_LISTS = ("layer_types",)  # config lists with one entry per block


class DepthImportanceSettings(MethodSettings):
    """Depth pruning's own recipe field (besides the structured target: ratio, ratio_of, recovery)."""

    applies_to: ClassVar[str] = "depth"

    depth_importance: DepthImportance = Field(
        default="loss", description="depth: loss (calibration loss increase when a block is skipped) | influence"
    )


class DepthSettings(BaseModel):
    """What depth pruning needs from a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: float = Field(gt=0.0, lt=1.0)
    ratio_of: RatioOf = "decoder"
    importance: DepthImportance = "loss"


@dataclass
class DepthResult:
    parameters_before: int
    parameters_after: int
    importance: list[float]  # per block of the dense model: larger is more important
    removed: list[int]
    seconds: float


def blocks_to_remove(model: nn.Module, settings: DepthSettings) -> int:
    """How many blocks `ratio` of the counted parameters is; refuses what cannot be done."""
    blocks = adapter_for(model).blocks(model)
    per_block = parameter_count(blocks[0])
    count = round(settings.ratio * counted_parameters(model, settings.ratio_of) / per_block)
    if count < 1 or count >= len(blocks):
        raise StructuredPruningError(
            f"{settings.ratio:.0%} of the {settings.ratio_of} parameters is {count} of {len(blocks)} blocks; "
            "depth pruning removes at least one block and keeps at least one"
        )
    return count


def _hidden(value: object) -> torch.Tensor:
    """A block's hidden states, whether it returns a tensor or a tuple starting with one."""
    return value if isinstance(value, torch.Tensor) else value[0]  # type: ignore[index]


@contextlib.contextmanager
def _skipped(block: nn.Module) -> Iterator[None]:
    """The block passes its input through unchanged while the context lasts."""

    def pass_through(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    handle = block.register_forward_hook(pass_through, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _mean_loss(model: nn.Module, calibration: torch.Tensor, device: str) -> float:
    losses = [
        model(input_ids=row.unsqueeze(0).to(device), labels=row.unsqueeze(0).to(device), use_cache=False).loss.item()
        for row in calibration
    ]
    return sum(losses) / len(losses)


def _influence(model: nn.Module, blocks: nn.ModuleList, calibration: torch.Tensor, device: str) -> list[float]:
    sums = [0.0] * len(blocks)
    tokens = 0

    def recorder(index: int):
        def hook(module, args, kwargs, output):
            hidden_in = kwargs.get("hidden_states", args[0] if args else None).float()
            cosine = torch.nn.functional.cosine_similarity(hidden_in, _hidden(output).float(), dim=-1)
            sums[index] += float((1 - cosine).sum())

        return hook

    handles = [block.register_forward_hook(recorder(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        for row in calibration:
            model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            tokens += row.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [s / tokens for s in sums]


@torch.no_grad()
def block_importance(
    model: nn.Module, calibration: torch.Tensor, how: DepthImportance, device: str = "cpu", progress: bool = True
) -> list[float]:
    """One score per block, larger meaning the model needs it more."""
    home = next(model.parameters()).device
    model.to(device).eval()
    blocks = adapter_for(model).blocks(model)
    try:
        if how == "influence":
            return _influence(model, blocks, calibration, device)
        dense = _mean_loss(model, calibration, device)
        scores = []
        for block in tqdm(blocks, desc="block importance", leave=False, disable=not progress):
            with _skipped(block):
                scores.append(_mean_loss(model, calibration, device) - dense)
        return scores
    finally:
        model.to(home)


def remove_blocks(model: nn.Module, removed: list[int]) -> None:
    """Drop the blocks `removed` in place; the layers left are renumbered and the config describes them."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    kept = [i for i in range(len(blocks)) if i not in set(removed)]
    owner_path, _, name = adapter.blocks_path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    setattr(owner, name, nn.ModuleList([blocks[i] for i in kept]))
    for new_index, block in enumerate(adapter.blocks(model)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):  # the KV cache is indexed by it
                module.layer_idx = new_index
    config = model.config
    for key in PER_LAYER_LISTS:
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == len(blocks):
            setattr(config, key, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)


def prune_depth(
    model: nn.Module,
    calibration: torch.Tensor,
    settings: DepthSettings,
    device: str = "cpu",
    progress: bool = True,
    importance: list[float] | None = None,
) -> DepthResult:
    """Remove the least important blocks in place; `importance` may be passed in (e.g. from a checkpoint)."""
    started = time.perf_counter()
    count = blocks_to_remove(model, settings)
    if importance is None:
        importance = block_importance(model, calibration, settings.importance, device, progress)
    order = sorted(range(len(importance)), key=lambda i: (importance[i], i))
    removed = sorted(order[:count])
    before = parameter_count(model)
    remove_blocks(model, removed)
    return DepthResult(before, parameter_count(model), importance, removed, time.perf_counter() - started)
