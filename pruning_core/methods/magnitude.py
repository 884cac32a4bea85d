"""Magnitude pruning: drop the smallest |W| (per matrix, or per N:M group)."""

from __future__ import annotations

import torch

from pruning_core.masks import select
from pruning_core.methods.base import LayerProblem


def prune_magnitude(problem: LayerProblem) -> torch.Tensor:
    weight = problem.weight
    mask = select(weight.abs(), problem.target, per_row=False)
    return weight.masked_fill(mask, 0.0)
