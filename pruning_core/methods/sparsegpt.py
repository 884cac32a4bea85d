"""SparseGPT (Frantar & Alistarh, 2023): approximate OBS column by column with lazy block updates."""

from __future__ import annotations

import torch

from pruning_core.masks import lowest_n_of_m, lowest_overall, quota
from pruning_core.methods.base import LayerProblem
from pruning_core.stats import damped_inverse, dead_columns


def aligned_block_size(block_size: int, problem: LayerProblem) -> int:
    """Blocks must hold whole N:M groups."""
    m = problem.target.m if problem.target.is_nm else 1
    return max(m, block_size // m * m)


def prune_sparsegpt(problem: LayerProblem) -> torch.Tensor:
    target = problem.target
    weight = problem.weight.clone()
    rows, cols = weight.shape
    hessian = problem.stats.hessian()
    weight[:, dead_columns(hessian)] = 0
    inverse, _ = damped_inverse(hessian, problem.damping, problem.name)
    # Upper Cholesky of H^-1: row j holds the OBS update for eliminating column j given columns < j frozen.
    upper = torch.linalg.cholesky(inverse, upper=True)
    block = aligned_block_size(problem.block_size, problem)

    for start in range(0, cols, block):
        end = min(start + block, cols)
        w_block = weight[:, start:end].clone()
        u_block = upper[start:end, start:end]
        u_diag = torch.diagonal(u_block)
        errors = torch.zeros_like(w_block)
        if target.is_nm:
            mask = torch.zeros_like(w_block, dtype=torch.bool)
        else:
            mask = lowest_overall(w_block**2 / u_diag**2, quota(target.ratio, start, end, rows))
        for i in range(end - start):
            if target.is_nm and i % target.m == 0:
                group = slice(i, i + target.m)
                mask[:, group] = lowest_n_of_m(w_block[:, group] ** 2 / u_diag[group] ** 2, target.n, target.m)
            column = w_block[:, i]
            error = torch.where(mask[:, i], column, torch.zeros_like(column)) / u_block[i, i]
            w_block[:, i:] -= error.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        weight[:, start:end] = w_block.masked_fill(mask, 0.0)
        weight[:, end:] -= errors @ upper[start:end, end:]
    return weight
