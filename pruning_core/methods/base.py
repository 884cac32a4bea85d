"""What every pruning method receives, and the registry entry that describes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from pruning_core.masks import SparsityTarget
from pruning_core.method_settings import MethodSettings, NoSettings
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
    settings: MethodSettings | None = None  # the method's own (its recipe fields); None: the method's plain solve


@dataclass(frozen=True)
class Method:
    """A pruning method: `prune` returns the new weight; `needs` says which statistics to collect."""

    prune: Callable[[LayerProblem], torch.Tensor]
    needs: Needs
    version: str = "1"  # bump when the method's output changes: it is part of every run fingerprint
    settings: type[MethodSettings] = NoSettings  # its own recipe fields


@dataclass(frozen=True)
class StructuredMethod:
    """A structured method (whole heads, channels or blocks over the whole model, `pruning_core.structured`)."""

    version: str  # bump when its output changes: it is part of every run fingerprint
    settings: type[MethodSettings] = NoSettings
