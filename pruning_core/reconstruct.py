"""Block reconstruction after the layer-wise prune (as in "A Free Lunch in LLM Compression", arXiv 2510.14444).

A layer-wise method fits each linear to its own dense outputs; errors still compound through the block's
attention, norms and MLP. With every mask fixed, the block's kept linear weights are then fitted jointly to
the dense block's outputs on the block's calibration inputs: a few epochs of Adam on the output error
(relative to what the dense block adds to its residual stream), removed weights held at exactly zero after
every step (so any N:M pattern stays as it was).

Deterministic: the sample order comes from a generator seeded by the block, so a resumed prune refits a
block exactly as the uninterrupted one. The refit is undone if it does not lower the block's error on the
calibration set, so the option never makes a block worse where it is measured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pruning_core.blocks import block_linears, run_block
from pruning_core.report import BlockReconstructionReport


class BlockReconstruction(BaseModel):
    """`block_reconstruction:` of an unstructured recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=2, ge=1, le=1000, description="passes over the block's calibration samples")
    batch_size: int = Field(default=4, ge=1, le=4096, description="calibration samples per optimizer step")
    learning_rate: float = Field(default=1e-5, gt=0.0, le=1.0, description="Adam's learning rate")


def _float32(value: Any) -> Any:
    """Floating tensors of the block's keyword arguments (rotary tables, masks) in float32, others as they are."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def _trained_in_float32(block: nn.Module, weights: list[nn.Parameter]) -> Iterator[None]:
    """Only `weights` require gradients, in float32 (the block's own dtype comes back on exit)."""
    dtype = weights[0].dtype
    flags = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    block.float()
    for w in weights:
        w.requires_grad_(True)
    try:
        yield
    finally:
        block.to(dtype)
        for p, flag in flags.items():
            p.requires_grad_(flag)


@torch.no_grad()
def block_error(
    block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, block_kwargs: dict[str, Any], batch: int
) -> float:
    """sum ||block(x) - y||^2 / sum ||y - x||^2 over the calibration samples: the error relative to what the
    dense block adds to its residual stream (relative to y itself, the residual would make every error tiny)."""
    error = change = 0.0
    for start in range(0, len(inputs), batch):
        x, y = inputs[start : start + batch].float(), targets[start : start + batch].float()
        error += float((run_block(block, x, block_kwargs).float() - y).square().sum())
        change += float((y - x).square().sum())
    return error / max(change, torch.finfo(torch.float32).tiny)


def reconstruct_block(
    block: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    block_kwargs: dict[str, Any],
    spec: BlockReconstruction,
    seed: int,
    forward_batch: int,
) -> BlockReconstructionReport:
    """Refit the kept weights of the block's linears to `targets` (the dense block's outputs on `inputs`)."""
    linears = list(block_linears(block).values())
    weights = [linear.weight for linear in linears]
    kwargs = _float32(block_kwargs)
    with _trained_in_float32(block, weights):
        keep = [w != 0 for w in weights]
        before = block_error(block, inputs, targets, kwargs, forward_batch)
        pruned = [w.detach().clone() for w in weights]
        optimizer = torch.optim.Adam(weights, lr=spec.learning_rate)
        generator = torch.Generator().manual_seed(seed)
        steps = 0
        for _ in range(spec.epochs):
            order = torch.randperm(len(inputs), generator=generator).to(inputs.device)
            for start in range(0, len(inputs), spec.batch_size):
                chosen = order[start : start + spec.batch_size]
                x, y = inputs[chosen].float(), targets[chosen].float()
                loss = (run_block(block, x, kwargs).float() - y).square().mean() / (y - x).square().mean().clamp_min(
                    1e-12
                )
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for w, kept in zip(weights, keep, strict=True):
                        w.mul_(kept)
                steps += 1
        after = block_error(block, inputs, targets, kwargs, forward_batch)
        if not after < before:
            with torch.no_grad():
                for w, original in zip(weights, pruned, strict=True):
                    w.copy_(original)
            after = before
    return BlockReconstructionReport(error_before=before, error_after=after, steps=steps, kept=after < before)
