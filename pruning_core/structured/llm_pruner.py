"""LLM-Pruner (Ma, Fang, Wang, NeurIPS 2023): gradient importance of dependency groups, block-wise ratios.

`ratio` is the fraction of the model's parameters to remove (embeddings included, as the paper counts).
The first `keep_first` and last `keep_last` blocks stay whole, so the blocks in between lose a larger
share: `ratio * all parameters / parameters of the pruned blocks' projections`. In each pruned block the
least important attention units go first (rounded to whole heads), then MLP channels make up the rest
of the block's share.
"""

from __future__ import annotations

import statistics as stats
import time
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pruning_core.adapters import STRUCTURED_PROJECTIONS, Projections, adapter_for
from pruning_core.structured.groups import (
    AttentionUnit,
    BlockShape,
    block_shape,
    effective_unit,
    head_dim,
    keep_attention,
    keep_channels,
    projection,
)
from pruning_core.structured.importance import (
    Aggregation,
    Importance,
    gradient_statistics,
    projection_weights,
    unit_importance,
)


class StructuredPruningError(ValueError):
    pass


class StructuredSettings(BaseModel):
    """What LLM-Pruner needs from a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: float = Field(gt=0.0, lt=1.0)
    importance: Importance = "element1"
    aggregation: Aggregation = "sum"
    keep_first: int = Field(default=4, ge=0)
    keep_last: int = Field(default=2, ge=0)
    attention_unit: AttentionUnit = "q_heads"


@dataclass
class BlockPlan:
    index: int
    keep_q: list[int]
    keep_kv: list[int]
    keep_channels: list[int]
    before: BlockShape
    after: BlockShape = field(init=False)

    def __post_init__(self) -> None:
        self.after = BlockShape(len(self.keep_q), len(self.keep_kv), len(self.keep_channels))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def projection_parameters(block: nn.Module, projections: Projections) -> int:
    return sum(p.numel() for name in projections.paths for p in block.get_submodule(name).parameters())


def pruned_block_indices(blocks: int, keep_first: int, keep_last: int) -> list[int]:
    indices = list(range(keep_first, blocks - keep_last))
    if not indices:
        raise StructuredPruningError(
            f"nothing to prune: the model has {blocks} blocks and keep_first={keep_first}, keep_last={keep_last}"
        )
    return indices


def _lowest(scores: torch.Tensor, count: int) -> set[int]:
    return set(torch.argsort(scores, stable=True)[:count].tolist()) if count else set()


def plan_block(
    index: int,
    block: nn.Module,
    attention: torch.Tensor,
    mlp: torch.Tensor,
    share: float,
    unit: AttentionUnit,
    projections: Projections,
) -> BlockPlan:
    """Which heads and channels block `index` keeps when it must lose `share` of its projection parameters."""
    shape = block_shape(block, projections)
    hidden = projection(block, "q", projections).in_features
    dim = head_dim(block, projections)
    per_kv = shape.heads // shape.kv_heads
    if effective_unit(shape, unit) == "q_heads":
        drop_per_kv = min(per_kv - 1, round(share * per_kv))
        keep_q = []
        for kv in range(shape.kv_heads):
            members = torch.arange(kv * per_kv, (kv + 1) * per_kv)
            dropped = {int(members[i]) for i in _lowest(attention[members], drop_per_kv)}
            keep_q += [int(h) for h in members if int(h) not in dropped]
        keep_kv = list(range(shape.kv_heads))
    else:
        dropped_kv = _lowest(attention, min(shape.kv_heads - 1, round(share * shape.kv_heads)))
        keep_kv = [kv for kv in range(shape.kv_heads) if kv not in dropped_kv]
        keep_q = [kv * per_kv + i for kv in keep_kv for i in range(per_kv)]
    removed_q, removed_kv = shape.heads - len(keep_q), shape.kv_heads - len(keep_kv)
    attention_removed = (2 * removed_q + 2 * removed_kv) * dim * hidden
    per_channel = 3 * hidden  # a gate row, an up row, a down column
    wanted = share * projection_parameters(block, projections) - attention_removed
    channels = min(shape.intermediate_size - 1, max(0, round(wanted / per_channel)))
    dropped_channels = _lowest(mlp, channels)
    keep = [c for c in range(shape.intermediate_size) if c not in dropped_channels]
    return BlockPlan(index, keep_q, keep_kv, keep, shape)


def apply_plan(block: nn.Module, plan: BlockPlan, projections: Projections) -> None:
    keep_attention(block, plan.keep_q, plan.keep_kv, projections)
    keep_channels(block, plan.keep_channels, projections)


@torch.no_grad()
def forward_latency_ms(model: nn.Module, tokens: int = 128, repeats: int = 5) -> float:
    """Median wall time of one forward pass over `tokens` tokens (batch 1) where the model sits."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    model(input_ids=ids, use_cache=False)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return 1000 * stats.median(times)


@dataclass
class StructuredResult:
    parameters_before: int
    parameters_after: int
    block_share: float
    plans: list[BlockPlan]
    seconds: float

    @property
    def removed(self) -> float:
        return 1 - self.parameters_after / self.parameters_before

    def layer_shapes(self) -> dict[int, dict[str, int]]:
        return {plan.index: plan.after.as_dict() for plan in self.plans}


def block_share(model: nn.Module, settings: StructuredSettings) -> float:
    """The share of each pruned block's projection parameters that must go; refuses what cannot be done.

    Needs only parameter counts, so a bad recipe fails before the gradient pass.
    """
    projections = structured_projections(model)
    blocks = adapter_for(model).blocks(model)
    indices = pruned_block_indices(len(blocks), settings.keep_first, settings.keep_last)
    share = (
        settings.ratio * parameter_count(model) / sum(projection_parameters(blocks[i], projections) for i in indices)
    )
    if share >= 0.95:
        raise StructuredPruningError(
            f"removing {settings.ratio:.0%} of the parameters from blocks {indices[0]}..{indices[-1]} alone would "
            f"take {share:.0%} of each; lower the ratio or keep fewer blocks whole (keep_first/keep_last)"
        )
    return share


def structured_projections(model: nn.Module) -> Projections:
    """The model's coupled projections, or a one-line refusal for a family llm_pruner cannot cut."""
    adapter = adapter_for(model)
    if adapter.projections is None:
        raise StructuredPruningError(
            f"llm_pruner supports the {', '.join(sorted(STRUCTURED_PROJECTIONS))} families, not {adapter.family!r}"
        )
    return adapter.projections


def statistics_weights(model: nn.Module, settings: StructuredSettings) -> dict[str, nn.Parameter]:
    """The projection weights whose gradients LLM-Pruner needs (those of the blocks it prunes)."""
    block_share(model, settings)  # fail before any work
    return _pruned_projections(model, settings)


def _pruned_projections(model: nn.Module, settings: StructuredSettings) -> dict[str, nn.Parameter]:
    adapter = adapter_for(model)
    indices = pruned_block_indices(len(adapter.blocks(model)), settings.keep_first, settings.keep_last)
    return projection_weights(model, adapter.blocks_path, indices, structured_projections(model))


def prune_structured(
    model: nn.Module,
    calibration: torch.Tensor,
    settings: StructuredSettings,
    device: str = "cpu",
    progress: bool = True,
    statistics: dict[str, torch.Tensor] | None = None,
) -> StructuredResult:
    """Remove the least important heads and channels in place; the model becomes physically smaller.

    `statistics` (from `gradient_statistics`) may be passed in to skip the gradient pass, e.g. on resume.
    """
    started = time.perf_counter()
    share = block_share(model, settings)  # refuses an impossible ratio before the gradient pass
    if statistics is None:
        weights = _pruned_projections(model, settings)
        statistics = gradient_statistics(model, weights, calibration, settings.importance, device, progress)
    adapter, projections = adapter_for(model), structured_projections(model)
    blocks = adapter.blocks(model)
    indices = pruned_block_indices(len(blocks), settings.keep_first, settings.keep_last)
    before = parameter_count(model)
    plans = []
    for index in indices:
        prefix = f"{adapter.block_prefix(index)}."
        block_statistics = {
            name.removeprefix(prefix).removesuffix(".weight"): s
            for name, s in statistics.items()
            if name.startswith(prefix)
        }
        attention, mlp = unit_importance(
            blocks[index],
            block_statistics,
            settings.importance,
            settings.aggregation,
            settings.attention_unit,
            projections,
        )
        plan = plan_block(index, blocks[index], attention, mlp, share, settings.attention_unit, projections)
        apply_plan(blocks[index], plan, projections)
        plans.append(plan)
    return StructuredResult(before, parameter_count(model), share, plans, time.perf_counter() - started)
