"""SparseGPT (Frantar & Alistarh, 2023): approximate OBS column by column with lazy block updates."""

from __future__ import annotations

import torch

from pruning_core.masks import SparsityTarget, lowest_n_of_m, lowest_overall, quota
from pruning_core.methods.base import LayerProblem


def aligned_block_size(block_size: int, problem: LayerProblem) -> int:
    """Blocks must hold whole N:M groups."""
    m = problem.target.m if problem.target.is_nm else 1
    return max(m, block_size // m * m)


# Columns eliminated eagerly inside a lazy block; the rest of the block gets one product per inner block.
INNER_BLOCK = 32


def prune_sparsegpt(problem: LayerProblem) -> torch.Tensor:
    target = problem.target
    weight = problem.weight.clone()
    rows, cols = weight.shape
    weight[:, problem.stats.dead_columns()] = 0
    # Upper Cholesky of H^-1: row j holds the OBS update for eliminating column j given columns < j frozen.
    upper = problem.stats.upper_factor_of_inverse(problem.damping, problem.name)
    block = aligned_block_size(problem.block_size, problem)
    inner = aligned_block_size(INNER_BLOCK, problem)

    for start in range(0, cols, block):
        end = min(start + block, cols)
        u_block = upper[start:end, start:end]
        # The block's columns as rows, so that every per-column operation touches contiguous memory.
        w_columns = weight[:, start:end].T.contiguous()
        if target.is_nm:
            mask = torch.zeros_like(w_columns, dtype=torch.bool)  # chosen group by group as the columns go
        else:
            score = w_columns**2 / torch.diagonal(u_block).unsqueeze(1) ** 2
            mask = lowest_overall(score, quota(target.ratio, start, end, rows))
        errors = eliminate_columns(w_columns, u_block, mask, target, inner)
        weight[:, start:end] = w_columns.T.masked_fill(mask.T, 0.0)
        weight[:, end:].addmm_(errors.T, upper[start:end, end:], alpha=-1.0)
    return weight


def eliminate_columns(
    w_columns: torch.Tensor, u_block: torch.Tensor, mask: torch.Tensor, target: SparsityTarget, inner: int
) -> torch.Tensor:
    """OBS column by column over one block (columns as rows of `w_columns`, updated in place); returns the errors.

    N:M groups are chosen when the elimination reaches them, from the weights updated so far; `inner` is a
    multiple of M, so a group never straddles an inner block whose updates are still pending.
    """
    errors = torch.zeros_like(w_columns)
    diagonal = torch.diagonal(u_block)
    size = len(w_columns)
    for inner_start in range(0, size, inner):
        inner_end = min(inner_start + inner, size)
        for i in range(inner_start, inner_end):
            if target.is_nm and i % target.m == 0:
                group = slice(i, i + target.m)
                score = (w_columns[group] ** 2 / diagonal[group].unsqueeze(1) ** 2).T
                mask[group] = lowest_n_of_m(score, target.n, target.m).T
            torch.mul(w_columns[i], mask[i], out=errors[i]).div_(diagonal[i])
            w_columns[i:inner_end].addr_(u_block[i, i:inner_end], errors[i], alpha=-1.0)
        if inner_end < size:
            w_columns[inner_end:].addmm_(
                u_block[inner_start:inner_end, inner_end:].T, errors[inner_start:inner_end], alpha=-1.0
            )
    return errors
