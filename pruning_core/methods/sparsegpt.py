"""SparseGPT (Frantar & Alistarh, 2023): approximate OBS column by column with lazy block updates."""

from __future__ import annotations

import torch

from pruning_core.masks import lowest_n_of_m, lowest_overall, quota
from pruning_core.methods.base import LayerProblem
from pruning_core.stats import dead_columns


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
    # Upper Cholesky of H^-1: row j holds the OBS update for eliminating column j given columns < j frozen.
    upper = problem.stats.upper_factor_of_inverse(problem.damping, problem.name)
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
            error = errors[:, i]
            torch.mul(w_block[:, i], mask[:, i], out=error).div_(u_diag[i])
            w_block[:, i:].addr_(error, u_block[i, i:], alpha=-1.0)
        weight[:, start:end] = w_block.masked_fill(mask, 0.0)
        weight[:, end:].addmm_(errors, upper[start:end, end:], alpha=-1.0)
    return weight
