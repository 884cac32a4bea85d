"""What every pruning method receives, and the registry entry that describes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from pruning_core.masks import SparsityTarget
from pruning_core.methods.refine import MaskRefinement
from pruning_core.stats import InputStatistics

Needs = Literal["nothing", "column_norms", "hessian"]
Refit = Literal["cg", "exact"]
RefitRidge = Literal["heldout", "none"]


@dataclass
class LayerProblem:
    """One linear layer to prune: its weight (rows x columns, float32) and input statistics."""

    name: str
    weight: torch.Tensor
    stats: InputStatistics | None
    target: SparsityTarget
    block_size: int = 128
    damping: float = 0.01
    refit: Refit = "cg"  # APT: how the kept weights are re-solved on the final mask
    refit_ridge: RefitRidge = "none"  # APT: pull the refit toward the removal updates, as held-out tokens say
    mask_refinement: MaskRefinement | None = None  # APT: ADMM steps that may move the first mask


@dataclass(frozen=True)
class Method:
    """A pruning method: `prune` returns the new weight; `needs` says which statistics to collect."""

    prune: Callable[[LayerProblem], torch.Tensor]
    needs: Needs
    version: str = "1"  # bump when the method's output changes: it is part of every run fingerprint
