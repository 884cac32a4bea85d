"""LLM-Pruner (Ma, Fang, Wang, NeurIPS 2023): gradient importance of dependency groups, width pruning.

`ratio` is the fraction of the decoder's parameters to remove (`ratio_of: decoder`, the default), or of
all parameters, embeddings included, as the paper counts (`ratio_of: all`). The embeddings are never
pruned, so counting them would make the decoder's share depend on the vocabulary: 20% of Gemma 3 270M
(262k-token embeddings) is 55% of its decoder.

`widths: uniform` (the default) prunes every block to the same widths, each block choosing which heads and
channels it keeps by importance; the head count divides the hidden size and the MLP width is a multiple of
32 (`channel_multiple`), so the folder is a stock config of the source's own model type. `widths: per_block`
keeps the first `keep_first` and last `keep_last` blocks whole (LLM-Pruner's setting); the blocks in between
then lose a larger share and the folder loads with secateur only. In each pruned block the least important
attention units go first (rounded to whole heads), then MLP channels make up the rest of the block's share.
"""

from __future__ import annotations

import statistics as stats
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from pruning_core.adapters import STRUCTURED_PROJECTIONS, Projections, adapter_for
from pruning_core.footprint import footprint
from pruning_core.method_settings import MethodSettings
from pruning_core.structured.groups import (
    AttentionUnit,
    BlockShape,
    block_shape,
    effective_unit,
    head_dim,
    head_rows,
    keep_attention,
    keep_channels,
    projection,
)
from pruning_core.structured.importance import (
    Aggregation,
    Importance,
    activation_statistics,
    gradient_statistics,
    projection_weights,
    unit_importance,
)
from pruning_core.structured.refit import gram_key, refit_kept_columns


class StructuredPruningError(ValueError):
    pass


Widths = Literal["uniform", "per_block"]
RatioOf = Literal["decoder", "all"]
PER_BLOCK_KEEP = (4, 2)  # LLM-Pruner's blocks kept whole at each end, with per-block widths
WidthRefit = Literal["least_squares", "none"]
# Uniform MLP widths are multiples of 32 (of 8 on widths under 256): llama.cpp quantizes in 32-value blocks,
# and its kernels, like GPU GEMMs, run at full speed on such rows. Measured under llama.cpp (f32, 2 cores),
# SmolLM2-135M at 1016 channels against the same weights zero-padded to 1024: prefill 1.0x against 1.4x dense,
# and q8_0 left down_proj unquantized.
CHANNEL_MULTIPLES = (32, 16, 8)


def channel_multiple(intermediate_size: int) -> int:
    """The largest of CHANNEL_MULTIPLES that is at most 1/16 of the MLP width (so small models stay prunable)."""
    return next((m for m in CHANNEL_MULTIPLES if 16 * m <= intermediate_size), CHANNEL_MULTIPLES[-1])


class WidthSettings(MethodSettings):
    """LLM-Pruner's own recipe fields (besides the structured target: ratio, ratio_of, recovery)."""

    applies_to: ClassVar[str] = "llm_pruner"

    widths: Widths = Field(
        default="uniform",
        description="llm_pruner: uniform (every block the same widths: a stock config) | per_block "
        "(keep_first/keep_last blocks whole; loads with secateur only)",
    )
    importance: Importance | None = Field(
        default=None,
        description="llm_pruner: activation | element1 | element2 | vector (default: activation with uniform "
        "widths, element1 with per_block)",
    )
    channel_refit: WidthRefit = Field(
        default="least_squares",
        description="llm_pruner: least_squares (down_proj/o_proj refit to the dense outputs on the calibration "
        "inputs) | none",
    )
    aggregation: Aggregation = Field(default="sum", description="llm_pruner: per-group sum | mean | max | prod")
    keep_first: int | None = Field(
        default=None, ge=0, description="llm_pruner, widths per_block: leading blocks kept whole (default 4)"
    )
    keep_last: int | None = Field(
        default=None, ge=0, description="llm_pruner, widths per_block: trailing blocks kept whole (default 2)"
    )
    attention_unit: AttentionUnit | None = Field(
        default=None,
        description="llm_pruner: q_heads | kv_groups | none (attention kept whole; the default with uniform "
        "widths, q_heads with per_block)",
    )


class StructuredSettings(BaseModel):
    """What LLM-Pruner needs from a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: float = Field(gt=0.0, lt=1.0)
    ratio_of: RatioOf = "decoder"
    widths: Widths = "uniform"
    importance: Importance | None = None  # None: activation with uniform widths, element1 per block
    aggregation: Aggregation = "sum"
    keep_first: int | None = Field(default=None, ge=0)
    keep_last: int | None = Field(default=None, ge=0)
    attention_unit: AttentionUnit | None = None  # None: none with uniform widths, q_heads per block
    refit: WidthRefit = "least_squares"
    refit_damp: float = Field(default=0.3, gt=0.0)  # measured, see refit.py

    @property
    def unit(self) -> AttentionUnit:
        """Uniform widths keep attention whole by default: measured on SmolLM2-135M at 20% of all parameters,
        removing a third of every block's heads gave 590 WikiText-2 perplexity before recovery, the MLP alone 114
        (dense 37). Per-block widths keep LLM-Pruner's q heads."""
        if self.attention_unit is not None:
            return self.attention_unit
        return "none" if self.widths == "uniform" else "q_heads"

    @property
    def scores(self) -> Importance:
        """What ranks heads and channels: activations with uniform widths (measured better, see importance.py,
        and forward passes only), LLM-Pruner's first-order gradients per block."""
        if self.importance is not None:
            return self.importance
        return "activation" if self.widths == "uniform" else "element1"

    @model_validator(mode="after")
    def _uniform_prunes_every_block(self) -> StructuredSettings:
        if self.widths == "uniform" and (self.keep_first or self.keep_last):
            raise ValueError(
                "keep_first/keep_last keep blocks whole, so the blocks' widths differ: add widths: per_block "
                "(the folder then loads with secateur only)"
            )
        return self

    @property
    def kept_whole(self) -> tuple[int, int]:
        """(leading, trailing) blocks left whole."""
        if self.widths == "uniform":
            return 0, 0
        first, last = PER_BLOCK_KEEP
        return (
            first if self.keep_first is None else self.keep_first,
            last if self.keep_last is None else self.keep_last,
        )


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


def counted_parameters(model: nn.Module, ratio_of: RatioOf) -> int:
    """The parameters a structured `ratio` is a fraction of (the embeddings are never pruned)."""
    counts = footprint(model)
    return counts.parameters if ratio_of == "all" else counts.decoder_parameters


def projection_parameters(block: nn.Module, projections: Projections) -> int:
    return sum(p.numel() for name in projections.paths for p in block.get_submodule(name).parameters())


def pruned_block_indices(blocks: int, keep_first: int, keep_last: int) -> list[int]:
    """The blocks that lose heads and channels."""
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
    stock: bool = False,
) -> BlockPlan:
    """Which heads and channels block `index` keeps when it must lose `share` of its projection parameters.

    `stock`: widths a stock config can describe (head count dividing the hidden size, MLP width a multiple
    of 8); the head count nearest the share's is taken and the MLP makes up the difference.
    """
    shape = block_shape(block, projections)
    hidden = projection(block, "q", projections).in_features
    dim = head_dim(block, projections)
    per_kv = shape.heads // shape.kv_heads
    if effective_unit(shape, unit) == "none":
        keep_q, keep_kv = list(range(shape.heads)), list(range(shape.kv_heads))
    elif effective_unit(shape, unit) == "q_heads":
        drop_per_kv = _nearest_drop(share, per_kv, shape.kv_heads, hidden if stock else None)
        keep_q = []
        for kv in range(shape.kv_heads):
            members = torch.arange(kv * per_kv, (kv + 1) * per_kv)
            dropped = {int(members[i]) for i in _lowest(attention[members], drop_per_kv)}
            keep_q += [int(h) for h in members if int(h) not in dropped]
        keep_kv = list(range(shape.kv_heads))
    else:
        drop_kv = _nearest_drop(share, shape.kv_heads, per_kv, hidden if stock else None)
        dropped_kv = _lowest(attention, drop_kv)
        keep_kv = [kv for kv in range(shape.kv_heads) if kv not in dropped_kv]
        keep_q = [kv * per_kv + i for kv in keep_kv for i in range(per_kv)]
    removed_q, removed_kv = shape.heads - len(keep_q), shape.kv_heads - len(keep_kv)
    attention_removed = (2 * removed_q + 2 * removed_kv) * dim * hidden
    per_channel = 3 * hidden  # a gate row, an up row, a down column
    wanted = share * projection_parameters(block, projections) - attention_removed
    channels = min(shape.intermediate_size - 1, max(0, round(wanted / per_channel)))
    multiple = channel_multiple(shape.intermediate_size)
    if stock and shape.intermediate_size - channels >= multiple:
        channels = shape.intermediate_size - _round_to(shape.intermediate_size - channels, multiple)
    dropped_channels = _lowest(mlp, channels)
    keep = [c for c in range(shape.intermediate_size) if c not in dropped_channels]
    return BlockPlan(index, keep_q, keep_kv, keep, shape)


def _nearest_drop(share: float, units: int, heads_per_unit: int, hidden: int | None) -> int:
    """How many of `units` attention units (each `heads_per_unit` q heads) to drop: the count nearest `share`
    of them (ties: fewer), keeping one, among those whose head count divides `hidden` (when given)."""
    allowed = [d for d in range(units) if hidden is None or hidden % ((units - d) * heads_per_unit) == 0]
    return min(allowed, key=lambda d: (abs(d - share * units), d))


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, multiple * round(value / multiple))


def apply_plan(
    block: nn.Module,
    plan: BlockPlan,
    projections: Projections,
    grams: dict[str, torch.Tensor] | None = None,
    damp: float = 0.3,
) -> None:
    """Cut the block to `plan`; with `grams` (input Gram per consumer part, "o"/"down"), refit what reads the
    cut channels so that it reproduces the dense outputs on the calibration inputs."""
    dense = {part: projection(block, part, projections).weight.detach().clone() for part in grams or {}}
    keep_attention(block, plan.keep_q, plan.keep_kv, projections)
    keep_channels(block, plan.keep_channels, projections)
    kept_columns = {"o": head_rows(plan.keep_q, head_dim(block, projections)), "down": torch.tensor(plan.keep_channels)}
    for part, gram in (grams or {}).items():
        if len(kept_columns[part]) == dense[part].shape[1]:
            continue  # nothing cut: the layer already computes the dense output
        weight = projection(block, part, projections).weight
        weight.data.copy_(refit_kept_columns(dense[part], gram, kept_columns[part], damp))


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
    indices = pruned_block_indices(len(blocks), *settings.kept_whole)
    counted = counted_parameters(model, settings.ratio_of)
    share = settings.ratio * counted / sum(projection_parameters(blocks[i], projections) for i in indices)
    if share >= 0.95:
        of = "the decoder's parameters" if settings.ratio_of == "decoder" else "all parameters"
        raise StructuredPruningError(
            f"removing {settings.ratio:.0%} of {of} from blocks {indices[0]}..{indices[-1]} would take {share:.0%} "
            "of each block's projections; lower the ratio"
            + (" or keep fewer blocks whole (keep_first/keep_last)" if settings.widths == "per_block" else "")
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


def _pruned_projections(model: nn.Module, settings: StructuredSettings) -> dict[str, nn.Parameter]:
    adapter = adapter_for(model)
    indices = pruned_block_indices(len(adapter.blocks(model)), *settings.kept_whole)
    return projection_weights(model, adapter.blocks_path, indices, structured_projections(model))


def _consumer_parts(settings: StructuredSettings) -> tuple[str, ...]:
    """The projections that read cut channels (down_proj always, o_proj when heads go), whose input Grams
    the activation importance and the refit need."""
    if settings.refit == "none" and settings.scores != "activation":
        return ()
    return ("down",) if settings.unit == "none" else ("o", "down")


def _refit_parts(settings: StructuredSettings) -> tuple[str, ...]:
    return () if settings.refit == "none" else _consumer_parts(settings)


def gram_layers(model: nn.Module, settings: StructuredSettings) -> tuple[str, ...]:
    """Module paths whose input Grams are accumulated during the statistics pass."""
    adapter, projections = adapter_for(model), structured_projections(model)
    indices = pruned_block_indices(len(adapter.blocks(model)), *settings.kept_whole)
    parts = _consumer_parts(settings)
    return tuple(f"{adapter.block_prefix(i)}.{projections.path(part)}" for i in indices for part in parts)


def importance_statistics(
    model: nn.Module,
    calibration: torch.Tensor,
    settings: StructuredSettings,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The slow measurement of a width prune: input Grams (forward only) for activation importance, else
    gradient sums (forward and backward) with the Grams the refit needs."""
    block_share(model, settings)  # refuse an impossible ratio before any work
    grams = gram_layers(model, settings)
    if settings.scores == "activation":
        return activation_statistics(model, calibration, grams, device, progress)
    weights = _pruned_projections(model, settings)
    return gradient_statistics(model, weights, calibration, settings.scores, device, progress, grams)


def _block_grams(
    statistics: dict[str, torch.Tensor], prefix: str, settings: StructuredSettings, projections: Projections
) -> dict[str, torch.Tensor]:
    grams = {}
    for part in _refit_parts(settings):
        key = gram_key(f"{prefix}{projections.path(part)}")
        if key not in statistics:
            raise StructuredPruningError(f"the statistics have no input Gram {key!r} for the refit (refit: none?)")
        grams[part] = statistics[key]
    return grams


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
        statistics = importance_statistics(model, calibration, settings, device, progress)
    adapter, projections = adapter_for(model), structured_projections(model)
    blocks = adapter.blocks(model)
    indices = pruned_block_indices(len(blocks), *settings.kept_whole)
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
            settings.scores,
            settings.aggregation,
            settings.unit,
            projections,
        )
        plan = plan_block(
            index,
            blocks[index],
            attention,
            mlp,
            share,
            settings.unit,
            projections,
            stock=settings.widths == "uniform",
        )
        grams = _block_grams(statistics, prefix, settings, projections)
        apply_plan(blocks[index], plan, projections, grams, settings.refit_damp)
        plans.append(plan)
    return StructuredResult(before, parameter_count(model), share, plans, time.perf_counter() - started)
