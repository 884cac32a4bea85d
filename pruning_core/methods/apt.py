"""APT (Zhao et al., 2024): optimal multiple-weight removal, unstructured and N:M.

Removing a set P of a row's weights at once:
    delta* = -w_P [(H^-1)_PP]^-1 (H^-1)_{P,:}        loss = 1/2 w_P [(H^-1)_PP]^-1 w_P^T
Columns are visited in blocks. In each block every row picks its set P from its current weights
(unstructured: by the OBS score, the block's quota shared by all rows as in SparseGPT; N:M: for
each group the N-subset with the least joint loss), then delta* for P is applied to all rows at
once: the |P| x |P| solves are batched over rows, and since P lies inside the block the update is one
(rows x block) @ (block x columns) product, so weights left of the block move too (nothing is frozen)
while earlier zeros are kept. Once the mask is complete, every row is refit to the least-squares
reconstruction on its kept inputs (delta* for the whole mask at once): by default a preconditioned
conjugate gradient over all rows at once (one rows x d @ d x d product per iteration, warm-started
from the removal updates), or the exact per-row Cholesky solve (`refit="exact"`, the reference).

A layer much wider than its calibration lets that refit fit the sample rather than the model. With
`refit_ridge="heldout"` the refit minimises (x - w) H (x - w)^T + rho ||x - u||^2, u the removal updates:
rho -> 0 is the full refit, rho -> inf keeps u. Rho is chosen per layer by fitting on most of the
calibration tokens and scoring on the rest (the statistics' held-out split), then solved on all of them.

By default the refit's mask is then refined (`mask_refinement`, ADMM in refine.py): a support of the same
size whose refit has a lower layer loss replaces it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import Field, model_validator

from pruning_core.masks import lowest_overall, quota
from pruning_core.methods.base import LayerProblem, MethodSettings, Refit, RefitRidge
from pruning_core.methods.refine import MaskRefinement, admm_mask, layer_loss
from pruning_core.methods.sparsegpt import aligned_block_size
from pruning_core.stats import InputStatistics, damped

log = logging.getLogger(__name__)


class AptSettings(MethodSettings):
    """APT's recipe fields."""

    applies_to: ClassVar[str] = "apt"

    refit: Refit = Field(
        default="cg",
        description="apt: least-squares refit on the final mask: cg (conjugate gradient over whole-layer "
        "products) | exact (one Cholesky per row, the reference)",
    )
    refit_ridge: RefitRidge = Field(
        default="none",
        description="apt: heldout (pull the refit toward the removal updates by a ridge chosen per layer on "
        "a held-out quarter of the calibration tokens: for layers wide for their calibration) | none",
    )
    mask_refinement: MaskRefinement | None = Field(
        default=MaskRefinement(),
        description="apt: after the first mask, ADMM steps that may swap kept and removed weights where the "
        "layer's loss says so (same sparsity, same N:M pattern), kept only when the loss is lower; null: off",
    )

    def needs_heldout(self) -> bool:
        return self.refit_ridge == "heldout"

    def check_settings(self) -> None:
        if self.refit_ridge != "none" and (self.refit == "exact" or self.mask_refinement is not None):
            raise ValueError(
                "refit_ridge is for the conjugate-gradient refit of the first mask: set refit: cg and "
                "mask_refinement: null"
            )

    @model_validator(mode="after")
    def _consistent(self):
        if type(self) is AptSettings:  # a recipe (which inherits this) checks in its own order
            self.check_settings()
        return self


# A bare layer problem (tests, benchmarks) gets the plain solve; a recipe's default refines its mask.
PLAIN = AptSettings(mask_refinement=None)

ROW_CHUNK_ELEMENTS = 2**25  # bounds the batched |P| x |P| systems held at once
# Conjugate-gradient refit: stop when every row's residual norm is below this fraction of its
# right-hand side, or after the cap (1e-5: looser ones cost whole-model perplexity at 70%, README).
# Preconditioned by H^-1 on the kept inputs, real SmolLM2 layers take 14-25 iterations (Jacobi: 27-69).
CG_TOLERANCE = 1e-5
CG_MAX_ITERATIONS = 150
# With mask refinement, the first mask's refit is solved in stages, each warm-started where the last stopped,
# until its loss and the CG's bound on its distance to the optimum decide which mask is better: on SmolLM2 the
# first stage decided 11 of 12 layers, on Gemma 3 at 50% and 2:4 most needed the full solve (which the
# second stage now often spares, and which no longer restarts from the removal updates).
SCREEN_TOLERANCES = (1e-2, 1e-3)
# Ridge strengths toward the removal updates (fractions of mean diag H), tried strongest first so that each
# solve warm-starts from a near one; the search stops once the held-out loss has risen twice.
RIDGE_STRENGTHS = (1.0, 0.3, 0.1, 0.03, 0.0)


def prune_apt(problem: LayerProblem) -> torch.Tensor:
    settings = problem.settings if isinstance(problem.settings, AptSettings) else PLAIN
    weight = problem.weight.clone()
    weight[:, problem.stats.dead_columns()] = 0
    inverse, damping = problem.stats.inverse(problem.damping, problem.name)
    updated, mask = select_mask(weight, inverse, problem, aligned_block_size(problem.block_size, problem))
    system = damped(problem.stats.hessian(), damping)
    if settings.mask_refinement is not None:
        return refined(weight, system, updated, mask, problem, settings)
    if settings.refit == "exact":
        return exact_refit(weight, system, mask)
    strength = 0.0
    if settings.refit_ridge == "heldout" and problem.stats.has_heldout():
        strength = heldout_ridge(weight, updated, mask, problem.stats, damping)
    ridge = strength * float(torch.diagonal(system).mean())
    refit = conjugate_gradient_refit(
        weight, system, mask, start=updated, anchor=updated, ridge=ridge, preconditioner=inverse
    )
    if refit.iterations == CG_MAX_ITERATIONS:
        log.info("%s: refit stopped at %d iterations, residual %.2g", problem.name, refit.iterations, refit.residual)
    return refit.weight


def select_mask(
    weight: torch.Tensor, inverse: torch.Tensor, problem: LayerProblem, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block by block: choose each row's removal set, apply delta* for it, keep earlier zeros.

    Returns (weights after every removal update, mask of removed weights).
    """
    target = problem.target
    current = weight.clone()
    mask = torch.zeros_like(weight, dtype=torch.bool)
    inverse_diag = torch.diagonal(inverse)
    for start in range(0, weight.shape[1], block):
        end = min(start + block, weight.shape[1])
        w_block = current[:, start:end]
        inverse_block = inverse[start:end, start:end]
        if target.is_nm:
            chosen = best_n_of_m_subsets(w_block, inverse_block, target.n, target.m)
        else:
            # Like SparseGPT, the block's quota is shared by all rows, so rows that matter less give more.
            score = w_block**2 / inverse_diag[start:end]
            chosen = lowest_overall(score, quota(target.ratio, start, end, weight.shape[0]))
        if not chosen.any():
            continue
        # delta* = -c (H^-1)_{P,:} with c = w_P [(H^-1)_PP]^-1; c is zero outside the block.
        coefficients = removal_coefficients(w_block, inverse_block, chosen)
        current.addmm_(coefficients, inverse[start:end], alpha=-1.0)
        mask[:, start:end] = chosen
        current[:, :end].masked_fill_(mask[:, :end], 0.0)
    return current, mask


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

    def system(self, padded: torch.Tensor, columns: int) -> torch.Tensor:
        """matrix[P, P] for every row, from `padded = with_identity_padding(matrix, ...)`.

        Padding slot t gathers from the identity block after the matrix (index columns + t), so the systems
        come out of one gather, with no masking pass over them.
        """
        width = self.positions.shape[1]
        slots = torch.arange(columns, columns + width, device=padded.device)
        indices = torch.where(self.valid, self.positions, slots)
        return padded[indices.unsqueeze(-1), indices.unsqueeze(-2)]

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


def with_identity_padding(matrix: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """`matrix` with an identity block after it, wide enough for the padding of any row batch (built once)."""
    columns, width = matrix.shape[0], int(selected.sum(dim=1).max()) if selected.numel() else 0
    padded = matrix.new_zeros(columns + width, columns + width)
    padded[:columns, :columns] = matrix
    padded.diagonal()[columns:] = 1.0
    return padded


def solve_on_selected(matrix: torch.Tensor, values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Row r: x_S with matrix[S, S] x_S = values[r, S], S the row's selected columns; zero elsewhere."""
    result = torch.zeros_like(values)
    padded = with_identity_padding(matrix, selected)
    for batch in row_batches(selected):
        factor = torch.linalg.cholesky(batch.system(padded, matrix.shape[0]))
        solved = cholesky_solve(factor, batch.take(values)).squeeze(-1)
        result[batch.rows] = result[batch.rows].scatter(1, batch.positions, solved * batch.valid)
    return result


def removal_coefficients(w_block: torch.Tensor, inverse_block: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Row r: w_P [(H^-1)_PP]^-1 scattered onto P (zero elsewhere), for the block's columns.

    A row removing more than half of the block solves the smaller complement instead: with
    G = ((H^-1)_BB)^-1 and Q the block's other columns, [(H^-1)_PP]^-1 = G_PP - G_PQ G_QQ^-1 G_QP, so
    c = ((w_P - y_Q) G)_P where G_QQ y_Q = (w_P G)_Q: |Q| x |Q| systems instead of |P| x |P|.
    """
    complement = chosen.sum(dim=1) > w_block.shape[1] // 2
    coefficients = solve_on_selected(inverse_block, w_block, chosen & ~complement.unsqueeze(1))
    if complement.any():
        rows = complement.nonzero().squeeze(1)
        precision = torch.cholesky_inverse(torch.linalg.cholesky(inverse_block))
        removed = w_block[rows] * chosen[rows]
        projected = removed @ precision  # row r: (w_P G) over the whole block
        others = solve_on_selected(precision, projected, ~chosen[rows])  # y_Q scattered onto Q
        coefficients[rows] = ((removed - others) @ precision) * chosen[rows]
    return coefficients


def refined(
    weight: torch.Tensor,
    system: torch.Tensor,
    updated: torch.Tensor,
    mask: torch.Tensor,
    problem: LayerProblem,
    settings: AptSettings,
) -> torch.Tensor:
    """The refit of the ADMM-refined mask when its loss is lower than the first mask's refit, else the latter.

    ADMM starts from the removal updates (`updated`): on real layers that ends as low as starting from the
    first mask's refit, so that refit is needed only to compare against. It is solved loosely first: its loss
    minus the CG's bound on the distance to its optimum (`CGRefit.gap_bound`) is a lower bound of the exact
    refit's loss, and once the refined mask is below that bound the exact one is never needed; once it is above
    the loose refit's loss, the first mask wins. Otherwise the refit goes on to the next tolerance.
    """
    inverse, damping = problem.stats.inverse(problem.damping, problem.name)
    eigen = problem.stats.eigen(damping)
    other, start = admm_mask(weight, eigen, updated, mask, problem.target, settings.mask_refinement)
    exact = settings.refit == "exact"

    def refit(support: torch.Tensor, begin: torch.Tensor, tolerance: float = CG_TOLERANCE) -> CGRefit:
        if exact:
            return CGRefit(exact_refit(weight, system, support), 0, 0.0, 0.0)
        return conjugate_gradient_refit(
            weight, system, support, start=begin, preconditioner=inverse, tolerance=tolerance
        )

    if torch.equal(other, mask):
        return refit(mask, updated).weight
    second = refit(other, start).weight
    second_loss = layer_loss(weight, second, system)
    first = refit(mask, updated, tolerance=SCREEN_TOLERANCES[0])
    for tolerance in (*SCREEN_TOLERANCES[1:], CG_TOLERANCE):
        first_loss = layer_loss(weight, first.weight, system)
        if second_loss < first_loss - first.gap_bound:  # below the first mask's exact refit: decided
            log.debug("%s: refined mask moves %d weights", problem.name, int((other & ~mask).sum()))
            return second
        if second_loss >= first_loss:  # the first mask's refit is better even unfinished: finish it
            return refit(mask, first.weight).weight
        first = refit(mask, first.weight, tolerance=tolerance)  # closer, from where it stopped
    gained = second_loss < layer_loss(weight, first.weight, system)
    log.debug("%s: refined mask moves %d weights, kept: %s", problem.name, int((other & ~mask).sum()), gained)
    return second if gained else first.weight


def heldout_ridge(
    weight: torch.Tensor, updated: torch.Tensor, mask: torch.Tensor, stats: InputStatistics, damping: float
) -> float:
    """The ridge strength whose refit on the fit tokens has the least loss on the held-out tokens, scaled to all
    the tokens (a ridge on normalised statistics shrinks as 1 / tokens)."""
    fit, held = damped(stats.fit_hessian(), damping), stats.heldout_hessian()
    scale = float(torch.diagonal(fit).mean())
    best, best_loss, rises, start = 0.0, float("inf"), 0, updated
    for strength in RIDGE_STRENGTHS:
        refit = conjugate_gradient_refit(weight, fit, mask, start=start, anchor=updated, ridge=strength * scale)
        loss, start = layer_loss(weight, refit.weight, held), refit.weight
        if loss < best_loss:
            best, best_loss, rises = strength, loss, 0
        else:
            rises += 1
            if rises == 2:
                break
    return best * (stats.tokens - stats.heldout_tokens) / stats.tokens


@dataclass
class CGRefit:
    weight: torch.Tensor
    iterations: int
    residual: float  # the worst row's relative residual at the end
    # Bound on loss(weight) - loss(exact refit), for the H^-1 preconditioner without ridge (else inf):
    # with r the residual on the kept inputs K, that gap is r (H_KK)^-1 r^T <= r (H^-1)_KK r^T (Schur complement).
    gap_bound: float


def conjugate_gradient_refit(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    mask: torch.Tensor,
    start: torch.Tensor,
    anchor: torch.Tensor | None = None,
    ridge: float = 0.0,
    preconditioner: torch.Tensor | None = None,
    tolerance: float = CG_TOLERANCE,
    max_iterations: int = CG_MAX_ITERATIONS,
) -> CGRefit:
    """Least squares on each row's kept inputs, all rows at once: min_x 1/2 x H x^T - x (H w^T) over x_K,
    plus ridge/2 ||x - anchor||^2 when given.

    Conjugate gradient with every row its own step sizes, preconditioned by `preconditioner` (H^-1, projected
    onto the kept inputs: one more product per iteration, far fewer iterations) or else by diag H; each
    iteration is one (rows x d) @ (d x d) product (two with H^-1). The residual is projected onto the kept
    inputs, so removed weights stay exactly zero.
    """
    keep = (~mask).to(weight.dtype)
    target = (weight @ hessian).mul_(keep)
    if ridge > 0:
        target.add_(anchor * keep, alpha=ridge)
        hessian = hessian.clone()
        hessian.diagonal().add_(ridge)
    target_norm = target.norm(dim=1).clamp_min(torch.finfo(weight.dtype).tiny)
    solution = start * keep
    residual = target - (solution @ hessian).mul_(keep)
    inverse = preconditioner
    jacobi = 1.0 / torch.diagonal(hessian)

    def precondition(values: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        # H^-1 restricted to the kept inputs: (H^-1)_KK is near (H_KK)^-1 where few inputs go.
        if inverse is None:
            return values * jacobi
        return (values @ inverse).mul_(kept)

    preconditioned = precondition(residual, keep)
    direction = preconditioned.clone()
    rho = (residual * preconditioned).sum(dim=1)
    relative = residual.norm(dim=1) / target_norm
    iterations = 0
    while float(relative.max()) > tolerance and iterations < max_iterations:
        # A converged row stops moving (in float32 its tiny steps would only add rounding noise) and drops out
        # of the products: on real layers the rows still moving average 60-85% of all over a refit.
        rows = (relative > tolerance).nonzero().squeeze(1)
        moving, kept, rho_rows = direction[rows], keep[rows], rho[rows]
        product = (moving @ hessian).mul_(kept)
        curvature = (moving * product).sum(dim=1)
        usable = (curvature > 0) & torch.isfinite(curvature)
        step = torch.where(usable, rho_rows / curvature.where(usable, 1.0), 0.0).unsqueeze(1)
        solution[rows] += step * moving
        row_residual = residual[rows].addcmul_(step, product, value=-1.0)
        residual[rows] = row_residual
        row_preconditioned = precondition(row_residual, kept)
        preconditioned[rows] = row_preconditioned
        rho_next = (row_residual * row_preconditioned).sum(dim=1)
        beta = torch.where(usable & (rho_rows > 0), rho_next / rho_rows.where(rho_rows > 0, 1.0), 0.0).unsqueeze(1)
        direction[rows] = torch.where(usable.unsqueeze(1), moving * beta + row_preconditioned, moving)
        rho[rows] = torch.where(usable, rho_next, rho_rows)
        relative[rows] = row_residual.norm(dim=1) / target_norm[rows]
        iterations += 1
    worst = float(relative.max())
    bound = float((residual * preconditioned).sum()) if inverse is not None and ridge == 0 else float("inf")
    return CGRefit(solution, iterations, worst, bound)


def cholesky_solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve L L^T x = b with two triangular solves (much faster than torch.cholesky_solve on CPU)."""
    half = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.transpose(-1, -2), half, upper=True)


def exact_refit(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact per-row least squares on the kept inputs: w'_K = (H_KK)^-1 (H w^T)_K, w'_P = 0.

    The reference for the conjugate-gradient refit: one Cholesky per row (rows x k^3). Solved in
    float32 with one step of iterative refinement against a float64 residual, which brings the result
    close to float64 accuracy at float32 cost.
    """
    hessian64 = hessian.double()
    targets = weight.double() @ hessian64  # row r holds (H w_r^T)^T
    result = torch.zeros_like(weight, dtype=torch.float64)
    factors = []
    padded = with_identity_padding(hessian, ~mask)
    for batch in row_batches(~mask):
        factor = torch.linalg.cholesky(batch.system(padded, hessian.shape[0]))
        solution = cholesky_solve(factor, batch.take(targets).float()).squeeze(-1).double()
        result[batch.rows] = result[batch.rows].scatter(1, batch.positions, solution)
        factors.append((batch, factor))
    # The residual H_KK x - b of every row at once, from one dense float64 product.
    residual = targets - result @ hessian64
    for batch, factor in factors:
        correction = cholesky_solve(factor, batch.take(residual).float()).squeeze(-1).double()
        result[batch.rows] = result[batch.rows].scatter_add(1, batch.positions, correction)
    return result.to(weight.dtype)
