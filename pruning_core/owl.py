"""OWL (Yin et al., 2024): outlier-weighted layer-wise sparsity.

A block whose Wanda scores `|W_ij| * ||X_j||` hold a larger share of outliers (scores above M times the
block's mean score) matters more and gets a lower sparsity. The shares are min-max scaled to [0, 2λ] and
centred on their mean: block sparsities spread over 2λ and their mean is exactly the target. The spread
is not centred on the target (one outlier-heavy block among many lands near target - 2λ), so recipes
keep the target within (2λ, 1 - 2λ).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.adapters import adapter_for, to_device
from pruning_core.blocks import capture_block_inputs
from pruning_core.engine import forward_budget, observe_groups, samples_per_forward
from pruning_core.experts import EXPERT_SIDES, ExpertObserver
from pruning_core.stats import StatisticsPlan


def _wanda_scores(block: nn.Module, name: str, observer) -> list[torch.Tensor]:
    """|W_ij| * ||X_j|| of one linear, or of each expert's slice (on its routed tokens) of a fused weight."""
    if isinstance(observer, ExpertObserver):
        weight = getattr(observer.experts, EXPERT_SIDES[observer.tap.side])
        return [
            (weight[e].abs().to(torch.float32) * stats.column_norms()).flatten()
            for e, stats in enumerate(observer.expert_stats)
            if stats is not None
        ]
    return [(block.get_submodule(name).weight.abs().to(torch.float32) * observer.stats.column_norms()).flatten()]


def owl_sparsities(outlier_fractions: list[float], sparsity: float, lam: float) -> list[float]:
    """One sparsity per block: lower where the outlier fraction is higher, mean equal to `sparsity`."""
    fractions = torch.tensor(outlier_fractions, dtype=torch.float64)
    spread = fractions.max() - fractions.min()
    if spread == 0:
        return [sparsity] * len(outlier_fractions)
    scaled = (fractions - fractions.min()) / spread * (2 * lam)
    return (sparsity - (scaled - scaled.mean())).tolist()


@torch.no_grad()
def outlier_fractions(
    model: nn.Module, calibration: torch.Tensor, m: float = 5.0, device: str = "cpu", progress: bool = True
) -> list[float]:
    """Per block, the fraction of its prunable weights whose Wanda score exceeds `m` x the block's mean.

    Computed on the dense model, block by block, each block fed the dense outputs of the one before.
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    captured = capture_block_inputs(model, blocks, calibration)
    inputs, memo = captured.hidden.to(device), {}
    home = next(blocks[0].parameters()).device
    fractions = []
    for index in tqdm(range(len(blocks)), desc="OWL outliers", disable=not progress):
        block = blocks[index].to(device)
        block_kwargs = to_device(captured.kwargs[index], device, memo)
        groups = adapter.groups(block, inputs, block_kwargs)
        label = f"block {index} statistics"
        # The dense block is not changed here: statistics and outputs come from one pass.
        outputs = torch.empty_like(inputs)
        observers = observe_groups(
            adapter,
            block,
            groups,
            inputs,
            block_kwargs,
            device=device,
            statistics=StatisticsPlan(hessian=False),
            label=label,
            progress=progress,
            batch=samples_per_forward(block, inputs, forward_budget(device, None)),
            outputs=outputs,
        )
        scores = [
            score
            for group, observer in zip(groups, observers, strict=True)
            for name in group.linears
            for score in _wanda_scores(block, name, observer)
        ]
        flat = torch.cat(scores)
        fractions.append(float((flat > m * flat.mean()).to(torch.float64).mean()))
        inputs = outputs
        block.to(home)
    return fractions
