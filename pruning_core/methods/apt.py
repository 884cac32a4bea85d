"""APT (Zhao et al., 2024): optimal multiple-weight removal, unstructured and N:M.

Removing a set P of a row's weights at once:
    delta* = -w_P [(H^-1)_PP]^-1 (H^-1)_{P,:}        loss = 1/2 w_P [(H^-1)_PP]^-1 w_P^T
Columns are visited in blocks. In each block every row picks its set P from its current weights
(unstructured: by the OBS score, the block's quota shared by all rows as in SparseGPT; N:M: for
each group the N-subset with the least joint loss), then delta* for P is applied to all rows at
once with batched solves against the full H^-1, so weights left of the block move too (nothing is
frozen) while earlier zeros are kept. Once the mask is complete, every row is set to the exact
least-squares reconstruction on its kept inputs, which is delta* for the whole mask at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pruning_core.masks import lowest_overall, quota
from pruning_core.methods.base import LayerProblem
from pruning_core.methods.sparsegpt import aligned_block_size
from pruning_core.stats import damped, damped_inverse, dead_columns

ROW_CHUNK_ELEMENTS = 2**25  # bounds the batched |P| x |P| systems held at once


def prune_apt(problem: LayerProblem) -> torch.Tensor:
    weight = problem.weight.clone()
    hessian = problem.stats.hessian()
    weight[:, dead_columns(hessian)] = 0
    inverse, damping = damped_inverse(hessian, problem.damping, problem.name)
    mask = select_mask(weight, inverse, problem, aligned_block_size(problem.block_size, problem))
    return reconstruct_with_mask(weight, damped(hessian, damping), mask)


def select_mask(weight: torch.Tensor, inverse: torch.Tensor, problem: LayerProblem, block: int) -> torch.Tensor:
    """Block by block: choose each row's removal set, apply delta* for it, keep earlier zeros."""
    target = problem.target
    current = weight.clone()
    mask = torch.zeros_like(weight, dtype=torch.bool)
    inverse_diag = torch.diagonal(inverse)
    for start in range(0, weight.shape[1], block):
        end = min(start + block, weight.shape[1])
        w_block = current[:, start:end]
        if target.is_nm:
            chosen = best_n_of_m_subsets(w_block, inverse[start:end, start:end], target.n, target.m)
        else:
            # Like SparseGPT, the block's quota is shared by all rows, so rows that matter less give more.
            score = w_block**2 / inverse_diag[start:end]
            chosen = lowest_overall(score, quota(target.ratio, start, end, weight.shape[0]))
        if not chosen.any():
            continue
        block_mask = torch.zeros_like(mask)
        block_mask[:, start:end] = chosen
        current = current + removal_update(current, inverse, block_mask)
        mask |= block_mask
        current.masked_fill_(mask, 0.0)
    return mask


def best_n_of_m_subsets(w_block: torch.Tensor, inverse_block: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """For every group of m columns, the n-subset minimising w_S [(H^-1)_SS]^-1 w_S^T, per row."""
    rows, cols = w_block.shape
    subsets = torch.tensor(list(itertools.combinations(range(m), n)), device=w_block.device)  # (S, n)
    groups = torch.arange(0, cols, m, device=w_block.device)
    columns = groups[:, None, None] + subsets[None]  # (G, S, n)
    sub_inverse = inverse_block[columns.unsqueeze(-1), columns.unsqueeze(-2)]  # (G, S, n, n)
    sub_precision = torch.linalg.inv(sub_inverse)
    w_sets = w_block[:, columns]  # (rows, G, S, n)
    loss = torch.einsum("rgsi,gsij,rgsj->rgs", w_sets, sub_precision, w_sets)
    best = columns[torch.arange(len(groups), device=w_block.device)[None], loss.argmin(dim=2)]  # (rows, G, n)
    mask = torch.zeros_like(w_block, dtype=torch.bool)
    mask.scatter_(1, best.reshape(rows, -1), True)
    return mask


@dataclass
class RowBatch:
    """Rows whose selected columns are solved together, padded to one width."""

    rows: torch.Tensor  # (r,) row indices
    positions: torch.Tensor  # (r, k) selected columns first, ascending; padding points at unselected ones
    valid: torch.Tensor  # (r, k) False on padding

    def system(self, matrix: torch.Tensor) -> torch.Tensor:
        """matrix[P, P] for every row, with padding turned into identity rows and columns."""
        gathered = matrix[self.positions.unsqueeze(-1), self.positions.unsqueeze(-2)]
        if self.valid.all():
            return gathered
        gathered.masked_fill_(~(self.valid.unsqueeze(-1) & self.valid.unsqueeze(-2)), 0.0)
        gathered.diagonal(dim1=-2, dim2=-1).masked_fill_(~self.valid, 1.0)
        return gathered

    def take(self, values: torch.Tensor) -> torch.Tensor:
        """values[row, P] as a (r, k, 1) column, zero on padding."""
        return (torch.gather(values[self.rows], 1, self.positions) * self.valid).unsqueeze(-1)


def row_batches(selected: torch.Tensor, bucket: int = 32) -> Iterator[RowBatch]:
    """Rows grouped by how many columns they select (in buckets of `bucket`), in memory-bounded chunks.

    Padding a row to the widest of its bucket costs a little arithmetic and saves many small calls when
    counts differ per row (unstructured sparsity shared across rows). Padded slots solve to zero.
    """
    counts = selected.sum(dim=1)
    keys = (counts + bucket - 1) // bucket
    for key in keys.unique().tolist():
        if key == 0:
            continue
        rows = (keys == key).nonzero().squeeze(1)
        width = int(counts[rows].max())
        step = max(1, ROW_CHUNK_ELEMENTS // (width * width))
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            # Stable sort puts each row's selected columns first, in ascending order.
            order = torch.argsort((~selected[chunk]).to(torch.int8), dim=1, stable=True)[:, :width]
            valid = torch.arange(width, device=selected.device) < counts[chunk].unsqueeze(1)
            yield RowBatch(chunk, order, valid)


def removal_update(weight: torch.Tensor, inverse: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """delta* that zeroes the masked weights of every row at least loss."""
    coefficients = torch.zeros_like(weight)  # row r: w_P [(H^-1)_PP]^-1 scattered onto P
    for batch in row_batches(mask):
        solved = torch.linalg.solve(batch.system(inverse), batch.take(weight)).squeeze(-1)
        coefficients[batch.rows] = coefficients[batch.rows].scatter(1, batch.positions, solved)
    # One dense product instead of gathering (H^-1)_{P,:} for every row.
    return -(coefficients @ inverse)


def cholesky_solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve L L^T x = b with two triangular solves (much faster than torch.cholesky_solve on CPU)."""
    half = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.transpose(-1, -2), half, upper=True)


def reconstruct_with_mask(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact per-row least squares on the kept inputs: w'_K = (H_KK)^-1 (H w^T)_K, w'_P = 0.

    Solved with a float32 Cholesky and one step of iterative refinement against a float64
    residual, which brings the result close to float64 accuracy at float32 cost.
    """
    hessian64 = hessian.double()
    targets = weight.double() @ hessian64  # row r holds (H w_r^T)^T
    result = torch.zeros_like(weight, dtype=torch.float64)
    factors = []
    for batch in row_batches(~mask):
        factor = torch.linalg.cholesky(batch.system(hessian))
        solution = cholesky_solve(factor, batch.take(targets).float()).squeeze(-1).double()
        result[batch.rows] = result[batch.rows].scatter(1, batch.positions, solution)
        factors.append((batch, factor))
    # The residual H_KK x - b of every row at once, from one dense float64 product.
    residual = targets - result @ hessian64
    for batch, factor in factors:
        correction = cholesky_solve(factor, batch.take(residual).float()).squeeze(-1).double()
        result[batch.rows] = result[batch.rows].scatter_add(1, batch.positions, correction)
    return result.to(weight.dtype)
