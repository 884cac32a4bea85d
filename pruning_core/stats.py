"""Streaming input statistics of a linear layer: H = 2 X X^T / N and column norms."""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DAMPING_RETRIES = 4


def relative_output_error(dense: torch.Tensor, pruned: torch.Tensor, sample: torch.Tensor) -> float:
    """||X (W - W')^T||^2 / ||X W^T||^2 on a sample of the layer's inputs."""
    reference = sample @ dense.T
    return float((sample @ (dense - pruned).T).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))


@dataclass(frozen=True)
class StatisticsPlan:
    """What to accumulate for each observed input: squared column norms only, or the Hessian (with a
    held-out split of the tokens when a solve is judged on them)."""

    hessian: bool = True
    heldout_fraction: float = 0.0

    def start(self, columns: int, device: torch.device | str) -> InputStatistics:
        return InputStatistics(columns, device, self.hessian, self.heldout_fraction)


class InputStatistics:
    """Accumulates statistics over calibration batches of a linear's input (float32).

    With `heldout_fraction`, the last tokens of every batch are also summed apart (they stay in H too), so a
    solve can be fitted on the others and judged on those: `fit_hessian` and `heldout_hessian`.
    """

    def __init__(
        self, columns: int, device: torch.device | str, with_hessian: bool, heldout_fraction: float = 0.0
    ) -> None:
        self.columns = columns
        self.tokens = 0
        self.sum_sq = torch.zeros(columns, dtype=torch.float32, device=device) if not with_hessian else None
        self.sum_outer = torch.zeros(columns, columns, dtype=torch.float32, device=device) if with_hessian else None
        self.heldout_fraction = heldout_fraction if with_hessian else 0.0
        self.heldout_tokens = 0
        self.heldout_outer = torch.zeros_like(self.sum_outer) if self.heldout_fraction > 0 else None
        self._inverses: dict[float, tuple[torch.Tensor, float]] = {}
        self._upper_factors: dict[float, torch.Tensor] = {}
        self._eigen: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, self.columns).to(torch.float32)
        self.tokens += x.shape[0]
        if self.sum_outer is not None:
            add_upper_outer(self.sum_outer, x)  # its diagonal holds the squared column norms
        else:
            self.sum_sq += (x * x).sum(dim=0)
        if self.heldout_outer is not None:
            # The batch's last tokens: whole sequences of a multi-sample batch, the end of a single one.
            held = x[x.shape[0] - math.ceil(self.heldout_fraction * x.shape[0]) :]
            self.heldout_tokens += held.shape[0]
            add_upper_outer(self.heldout_outer, held)

    def column_norms(self) -> torch.Tensor:
        """||X_j||_2 for each input column j."""
        return (torch.diagonal(self.sum_outer) if self.sum_outer is not None else self.sum_sq).sqrt()

    def hessian(self) -> torch.Tensor:
        if self.sum_outer is None:
            raise RuntimeError("statistics were collected without the Hessian")
        return symmetric_hessian(self.sum_outer, self.tokens)

    def has_heldout(self) -> bool:
        """A held-out split with tokens on both sides of it."""
        return self.heldout_outer is not None and 0 < self.heldout_tokens < self.tokens

    def heldout_hessian(self) -> torch.Tensor:
        """2 X_h X_h^T / N_h over the held-out tokens."""
        return symmetric_hessian(self.heldout_outer, self.heldout_tokens)

    def fit_hessian(self) -> torch.Tensor:
        """2 X_f X_f^T / N_f over the other tokens."""
        return symmetric_hessian(self.sum_outer - self.heldout_outer, self.tokens - self.heldout_tokens)

    def dead_columns(self) -> torch.Tensor:
        """Inputs that were zero for every token (diag H == 0), from the sums, without building H."""
        return torch.diagonal(self.sum_outer) == 0

    # Linears that read the same input share these: q/k/v or gate/up factorise one Hessian, not three.
    def inverse(self, damping: float, layer: str = "") -> tuple[torch.Tensor, float]:
        """(damped H)^-1 and the damping used (see `damped_inverse`), computed once per damping."""
        if damping not in self._inverses:
            self._inverses[damping] = damped_inverse(self.hessian(), damping, layer)
        return self._inverses[damping]

    def eigen(self, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigenvalues, eigenvectors) of the damped H, computed once per damping."""
        if damping not in self._eigen:
            values, vectors = torch.linalg.eigh(damped(self.hessian(), damping))
            self._eigen[damping] = (values.clamp_min_(0.0), vectors)
        return self._eigen[damping]

    def upper_factor_of_inverse(self, damping: float, layer: str = "") -> torch.Tensor:
        """Upper Cholesky factor of (damped H)^-1, computed once per damping."""
        if damping not in self._upper_factors:
            self._upper_factors[damping] = torch.linalg.cholesky(self.inverse(damping, layer)[0], upper=True)
        return self._upper_factors[damping]


def symmetric_hessian(upper_sums: torch.Tensor, tokens: int) -> torch.Tensor:
    """2 X X^T / N from sums kept on and above the diagonal (`add_upper_outer`)."""
    upper = torch.triu(upper_sums)
    return (upper + torch.triu(upper, 1).T) * (2.0 / max(tokens, 1))


def damped(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """H with dead inputs set to 1 on the diagonal and λ·mean(diag H) added to it."""
    h = hessian.clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    diag += damping * diag.mean()
    return h


def damped_inverse(hessian: torch.Tensor, damping: float, layer: str = "") -> tuple[torch.Tensor, float]:
    """(H + λ mean(diag) I)^-1 via Cholesky; raises λ x10 on failure. Returns (inverse, λ used)."""
    for attempt in range(DAMPING_RETRIES + 1):
        h = damped(hessian, damping)
        factor, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            return torch.cholesky_inverse(factor), damping
        if attempt < DAMPING_RETRIES:
            log.warning("%s: Cholesky failed at damping %g, retrying with %g", layer, damping, damping * 10)
            damping *= 10
    raise RuntimeError(f"{layer}: Hessian is not positive definite even at damping {damping}")


def add_upper_outer(total: torch.Tensor, x: torch.Tensor, bands: int = 4) -> None:
    """total += X^T X on and above the diagonal only, in `bands` row bands (X^T X is symmetric).

    Each band is one GEMM against the columns from its own start onwards: 5/8 of the full product's
    work for 4 bands. Below the diagonal `total` holds partial sums to be ignored (`hessian` mirrors).
    """
    columns = x.shape[1]
    edges = [round(i * columns / bands) for i in range(bands + 1)]
    for start, end in itertools.pairwise(edges):
        if end > start:
            total[start:end, start:].addmm_(x[:, start:end].T, x[:, start:])
