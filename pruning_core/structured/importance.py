"""Importance of dependency groups: from activations (Minitron) or calibration-loss gradients (LLM-Pruner).

`activation` (forward passes only): an MLP channel's mean squared activation at down_proj's input, an
attention head's at o_proj's input, i.e. the diagonals of those layers' input Gram matrices (Minitron,
arXiv 2407.14679, ranks width by activations). Measured on SmolLM2-135M at 20% of all parameters (MLP
channels, 32 x 128 calibration tokens, WikiText-2 before recovery): activation 71.7, element1 81.6, Wanda's
|x| * |w| 76.7; it also needs no backward pass, so it is the default with uniform widths.

From gradients (LLM-Pruner, section 3.2), per weight element: first order `|W * g|` (element1), second
order with the Fisher diagonal `1/2 * W * F * W` (element2); per weight vector: `|sum(W * g)|` over the
group's slice (vector). Each coupled layer gives one score per unit (summed over the unit's slice); the
layers' scores are aggregated per unit by sum, mean, max or prod.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.adapters import LLAMA_PROJECTIONS, Projections
from pruning_core.structured.groups import AttentionUnit, block_shape, effective_unit
from pruning_core.structured.refit import InputGrams, gram_key

Importance = Literal["activation", "element1", "element2", "vector"]
Aggregation = Literal["sum", "mean", "max", "prod"]


def projection_weights(
    model: nn.Module, blocks_path: str, blocks: list[int], projections: Projections
) -> dict[str, nn.Parameter]:
    return {
        f"{blocks_path}.{i}.{name}.weight": model.get_submodule(f"{blocks_path}.{i}.{name}").weight
        for i in blocks
        for name in projections.paths
    }


def gradient_statistics(
    model: nn.Module,
    weights: dict[str, nn.Parameter],
    calibration: torch.Tensor,
    importance: Importance,
    device: str = "cpu",
    progress: bool = True,
    gram_layers: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Sum of per-sample gradients (element1, vector) or of their squares (element2, the Fisher diagonal).

    The whole model runs forward and backward once per calibration row; only `weights` keep gradients.
    The same forwards accumulate the input Gram matrices of the linears named in `gram_layers` (module
    paths), under `refit.gram_key`, for the least-squares refit of the layers that read pruned channels.
    """
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    wanted = {id(p) for p in weights.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    totals = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in weights.items()}
    with _measuring(model, device, gram_layers) as grams:
        try:
            for row in tqdm(calibration, desc="gradients", leave=False, disable=not progress):
                ids = row.unsqueeze(0).to(device)
                model.zero_grad(set_to_none=True)
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                for name, p in weights.items():
                    grad = p.grad.detach().to(torch.float32)
                    totals[name] += grad.square() if importance == "element2" else grad
        finally:
            model.zero_grad(set_to_none=True)
            for name, p in model.named_parameters():
                p.requires_grad_(flags[name])
    return {name: t.cpu() for name, t in totals.items()} | grams.totals_cpu


@torch.no_grad()
def activation_statistics(
    model: nn.Module,
    calibration: torch.Tensor,
    gram_layers: tuple[str, ...],
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Input Gram matrices of the linears named in `gram_layers`, over one forward pass per calibration row."""
    with _measuring(model, device, gram_layers) as grams:
        for row in tqdm(calibration, desc="activations", leave=False, disable=not progress):
            model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
    return grams.totals_cpu


@contextmanager
def _measuring(model: nn.Module, device: str, gram_layers: tuple[str, ...]) -> Iterator[InputGrams]:
    """The model on `device` in eval mode (no dropout: statistics of the deployed model) with Gram hooks on
    `gram_layers`; afterwards the hooks are gone and the model is back where and as it was."""
    home, was_training = next(model.parameters()).device, model.training
    model.to(device)
    model.eval()
    grams = InputGrams({name: model.get_submodule(name) for name in gram_layers})
    try:
        yield grams
    finally:
        grams.remove()
        model.train(was_training)
        model.to(home)


def _scores(weight: torch.Tensor, statistic: torch.Tensor, importance: Importance) -> torch.Tensor:
    """Per-element contribution; for `vector` the signed product, summed and made absolute per unit."""
    weight = weight.detach().to(torch.float32)
    if importance == "element1":
        return (weight * statistic).abs()
    if importance == "element2":
        return 0.5 * weight * statistic * weight
    return weight * statistic


def _unit_sum(element: torch.Tensor, units: int, dim: int) -> torch.Tensor:
    """Sum an element score over each of `units` equal slices along `dim` (rows 0, columns 1)."""
    rows = element if dim == 0 else element.T
    per_unit = rows.reshape(units, -1, rows.shape[1])
    return per_unit.sum(dim=(1, 2), dtype=torch.float64)


def _finish(total: torch.Tensor, importance: Importance) -> torch.Tensor:
    """Vector-wise importance is |sum of W * g| over the unit's whole slice; the others are sums already."""
    return total.abs() if importance == "vector" else total


def aggregate(layer_scores: list[torch.Tensor], how: Aggregation) -> torch.Tensor:
    stacked = torch.stack(layer_scores)
    reducers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "sum": lambda s: s.sum(0),
        "mean": lambda s: s.mean(0),
        "max": lambda s: s.amax(0),
        "prod": lambda s: s.prod(0),
    }
    return reducers[how](stacked)


def unit_importance(
    block: nn.Module,
    statistics: dict[str, torch.Tensor],
    importance: Importance,
    aggregation: Aggregation,
    attention_unit: AttentionUnit,
    projections: Projections = LLAMA_PROJECTIONS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention unit scores, MLP channel scores) of one block.

    `statistics` maps the block's relative projection names (`self_attn.q_proj`, ...) to gradient sums.
    Attention units are q heads (q rows + o columns) or kv groups (their q heads, the kv head's k/v rows,
    the o columns of those q heads).
    """
    shape = block_shape(block, projections)
    if importance == "activation":
        return _activation_importance(block, statistics, attention_unit, projections)

    def element(part: str) -> torch.Tensor:
        name = projections.path(part)
        return _scores(block.get_submodule(name).weight, statistics[name], importance)

    q = _unit_sum(element("q"), shape.heads, 0)
    o = _unit_sum(element("o"), shape.heads, 1)
    if effective_unit(shape, attention_unit) == "q_heads":
        attention = aggregate([_finish(q, importance), _finish(o, importance)], aggregation)
    else:
        per_kv = shape.heads // shape.kv_heads
        k = _unit_sum(element("k"), shape.kv_heads, 0)
        v = _unit_sum(element("v"), shape.kv_heads, 0)
        grouped = [q.reshape(shape.kv_heads, per_kv).sum(1), k, v, o.reshape(shape.kv_heads, per_kv).sum(1)]
        attention = aggregate([_finish(g, importance) for g in grouped], aggregation)
    channels = shape.intermediate_size
    mlp_layers = (("gate", 0), ("up", 0), ("down", 1))
    mlp = aggregate(
        [_finish(_unit_sum(element(name), channels, dim), importance) for name, dim in mlp_layers], aggregation
    )
    return attention, mlp


def _activation_importance(
    block: nn.Module, statistics: dict[str, torch.Tensor], attention_unit: AttentionUnit, projections: Projections
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = block_shape(block, projections)
    mlp = statistics[gram_key(projections.path("down"))].diagonal().to(torch.float64)
    unit = effective_unit(shape, attention_unit)
    if unit == "none":
        return torch.zeros(shape.heads, dtype=torch.float64), mlp
    per_head = statistics[gram_key(projections.path("o"))].diagonal().to(torch.float64).reshape(shape.heads, -1)
    heads = per_head.sum(1)
    return (heads if unit == "q_heads" else heads.reshape(shape.kv_heads, -1).sum(1)), mlp
