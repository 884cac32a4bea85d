"""Mask refinement at high sparsity: ADMM on a layer's loss from a first mask (as ALPS, arXiv 2406.07831).

    min_x (x - w) H (x - w)^T   subject to x having the first mask's number of zeros (or its N:M pattern)

is split into x (unconstrained least squares pulled toward z), z (x + u projected onto the sparsity: the
largest entries kept) and the scaled dual u, with the penalty rho growing each step so that the support
settles. Every x step is one (rows x d) @ (d x d) product: H = Q diag(l) Q^T is factorised once, and
(H + rho I)^-1 = Q diag(1 / (l + rho)) Q^T for every rho. The last z's support is then refit exactly as the
first mask was, and kept only if its loss is lower: refinement never makes the layer worse on its Hessian.
Its cost is bounded by the step count, not a clock, so that a resumed prune refines exactly as the first did.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from pruning_core.masks import SparsityTarget, lowest_n_of_m, lowest_overall


class MaskRefinement(BaseModel):
    """`mask_refinement:` of an APT recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations: int = Field(default=14, ge=1, le=10000, description="ADMM steps per layer at most")
    initial_rho: float = Field(
        default=0.3, gt=0.0, le=100.0, description="first penalty, as a fraction of the mean of diag H"
    )
    rho_growth: float = Field(default=1.22, ge=1.0, le=10.0, description="penalty factor per step")


def layer_loss(weight: torch.Tensor, candidate: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over rows of (x - w) H (x - w)^T."""
    change = candidate - weight
    return float((change @ hessian).mul_(change).sum())


def project(values: torch.Tensor, zeros: int, target: SparsityTarget) -> torch.Tensor:
    """The mask (True = removed) of the smallest entries: N:M per group, else `zeros` over the whole layer."""
    score = values * values
    if target.is_nm:
        return lowest_n_of_m(score, target.n, target.m)
    return lowest_overall(score, zeros)


def admm_mask(
    weight: torch.Tensor,
    eigen: tuple[torch.Tensor, torch.Tensor],
    start: torch.Tensor,
    mask: torch.Tensor,
    target: SparsityTarget,
    settings: MaskRefinement,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a new mask with as many zeros as `mask`, or the same N:M pattern; ADMM's weights on it), from `start`."""
    eigenvalues, basis = eigen  # of H: its mean eigenvalue is the mean of diag H
    pulled_target = ((weight @ basis) * eigenvalues) @ basis.T
    rho = settings.initial_rho * float(eigenvalues.mean())
    zeros = int(mask.sum())
    sparse, dual = start.masked_fill(mask, 0.0), torch.zeros_like(weight)
    support = mask
    for _ in range(settings.iterations):
        rhs = pulled_target + rho * (sparse - dual)
        dense = ((rhs @ basis) / (eigenvalues + rho)) @ basis.T
        support = project(dense + dual, zeros, target)
        sparse = (dense + dual).masked_fill_(support, 0.0)
        dual += dense - sparse
        rho *= settings.rho_growth
    return support, sparse
