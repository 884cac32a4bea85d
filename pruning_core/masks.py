"""Sparsity targets and mask selection helpers (True in a mask = pruned)."""

from __future__ import annotations

import numpy
import torch
from pydantic import BaseModel, ConfigDict


class SparsityTarget(BaseModel):
    """Unstructured at `ratio`, or N:M (n zeros in every m consecutive inputs of a row)."""

    model_config = ConfigDict(frozen=True)

    ratio: float | None = None
    n: int | None = None
    m: int | None = None

    @classmethod
    def parse_pattern(cls, pattern: str) -> SparsityTarget:
        try:
            n_text, m_text = pattern.split(":")
            n, m = int(n_text), int(m_text)
        except ValueError:
            raise ValueError(f"pattern must look like 'N:M' with integers, got {pattern!r}") from None
        if not 0 < n < m:
            raise ValueError(f"pattern N:M needs 0 < N < M, got {pattern!r}")
        return cls(n=n, m=m)

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def fraction(self) -> float:
        return self.n / self.m if self.is_nm else float(self.ratio)

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:.0%}"

    def check_columns(self, columns: int, layer: str) -> None:
        if self.is_nm and columns % self.m:
            raise ValueError(f"{layer}: {columns} input columns are not a multiple of M={self.m}")


def quota(ratio: float, start: int, end: int, per_unit: int = 1) -> int:
    """Zeros to place in columns [start, end) so that every prefix stays at round(ratio * size)."""
    return round(ratio * end * per_unit) - round(ratio * start * per_unit)


def lowest_per_row(score: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` lowest scores of each row."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count > 0:
        mask.scatter_(1, torch.topk(score, count, dim=1, largest=False).indices, True)
    return mask


def kth_smallest(flat: torch.Tensor, count: int) -> torch.Tensor:
    """The `count`-th smallest value of a 1-d tensor (numpy's introselect on CPU: about 2x torch.kthvalue there)."""
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        return torch.as_tensor(numpy.partition(flat.detach().numpy(), count - 1)[count - 1])
    return torch.kthvalue(flat, count).values


def lowest_overall(score: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of exactly `count` lowest scores of the whole tensor (ties at the threshold taken in index order).

    A k-th value and a comparison: several times faster than a top-k when `count` is half the tensor.
    """
    flat = score.flatten()
    if count <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if count >= flat.numel():
        return torch.ones_like(score, dtype=torch.bool)
    threshold = kth_smallest(flat, count)
    mask = flat < threshold
    ties = (flat == threshold).nonzero().squeeze(1)
    mask[ties[: count - int(mask.sum())]] = True
    return mask.view_as(score)


def lowest_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the n lowest scores in every group of m consecutive columns of each row."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def select(score: torch.Tensor, target: SparsityTarget, per_row: bool = True) -> torch.Tensor:
    """Mask for a whole matrix: N:M per group, else lowest per row (or overall)."""
    if target.is_nm:
        return lowest_n_of_m(score, target.n, target.m)
    if per_row:
        return lowest_per_row(score, round(target.ratio * score.shape[1]))
    return lowest_overall(score, round(target.ratio * score.numel()))
