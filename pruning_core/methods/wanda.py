"""Wanda (Sun et al., 2024): score |W_ij| * ||X_j||_2 within each output row; no weight update."""

from __future__ import annotations

import torch

from pruning_core.masks import select
from pruning_core.methods.base import LayerProblem


def prune_wanda(problem: LayerProblem) -> torch.Tensor:
    weight = problem.weight
    score = weight.abs() * problem.stats.column_norms().unsqueeze(0)
    return weight.masked_fill(select(score, problem.target, per_row=True), 0.0)
