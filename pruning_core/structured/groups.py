"""Dependency groups of a Llama-like block and the surgery that removes them.

Where the projections live comes from the family's adapter (`pruning_core.adapters.Projections`).

A group is what must be removed together for the block to still compute: an attention head couples
its q/k/v output rows with its o_proj input columns; an MLP channel couples gate/up output row c with
down_proj input column c. With grouped-query attention one k/v head serves several q heads, so the
unit is either a whole kv group (the kv head and all its q heads) or one q head, removed in equal
numbers from every kv group so that each kv head still serves the same number of q heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pruning_core.adapters import LLAMA_PROJECTIONS, Projections

AttentionUnit = Literal["q_heads", "kv_groups", "none"]  # none: attention kept whole, the MLP pruned alone


@dataclass(frozen=True)
class BlockShape:
    """Widths of one block: q heads, kv heads, MLP channels."""

    heads: int
    kv_heads: int
    intermediate_size: int

    def as_dict(self) -> dict[str, int]:
        return {"heads": self.heads, "kv_heads": self.kv_heads, "intermediate_size": self.intermediate_size}


def effective_unit(shape: BlockShape, unit: AttentionUnit) -> AttentionUnit:
    """The attention unit that can actually be removed in a block of this shape.

    Without GQA (one q head per kv head) a q head alone cannot go while its k/v stay useful: the unit is
    the whole head (q, k, v rows and o columns), i.e. a kv group. With a single kv head (MQA) there is no
    kv group to spare: only q heads can go.
    """
    if unit == "none":
        return unit
    if shape.heads == shape.kv_heads:
        return "kv_groups"
    if shape.kv_heads == 1:
        return "q_heads"
    return unit


def head_dim(block: nn.Module, projections: Projections = LLAMA_PROJECTIONS) -> int:
    return int(block.get_submodule(projections.attention).head_dim)


def projection(block: nn.Module, part: str, projections: Projections = LLAMA_PROJECTIONS) -> nn.Linear:
    """The block's `q`, `k`, `v`, `o`, `gate`, `up` or `down` projection."""
    return block.get_submodule(projections.path(part))


def block_shape(block: nn.Module, projections: Projections = LLAMA_PROJECTIONS) -> BlockShape:
    dim = head_dim(block, projections)
    return BlockShape(
        heads=projection(block, "q", projections).out_features // dim,
        kv_heads=projection(block, "k", projections).out_features // dim,
        intermediate_size=projection(block, "gate", projections).out_features,
    )


def _replace(block: nn.Module, part: str, index: torch.Tensor, dim: int, projections: Projections) -> None:
    owner, name = projections.path(part).rsplit(".", 1)
    module = block.get_submodule(owner)
    setattr(module, name, _sliced(getattr(module, name), index, dim))


def head_rows(heads: list[int] | torch.Tensor, dim: int) -> torch.Tensor:
    """Row indices of the given heads in a projection that stacks heads of `dim` rows each."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads.unsqueeze(1) * dim + torch.arange(dim)).reshape(-1)


def _sliced(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new linear keeping `index` along `dim` of the weight (0: output rows, 1: input columns)."""
    weight = linear.weight.data.index_select(dim, index.to(linear.weight.device))
    out_features, in_features = weight.shape
    has_bias = linear.bias is not None
    # Built on the meta device (no random init of a layer about to be overwritten), then given the slices.
    new = nn.Linear(in_features, out_features, bias=has_bias, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if has_bias:
        bias = linear.bias.data if dim == 1 else linear.bias.data.index_select(0, index.to(linear.bias.device))
        new.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return new


def keep_attention(
    block: nn.Module, keep_q: list[int], keep_kv: list[int], projections: Projections = LLAMA_PROJECTIONS
) -> None:
    """Keep q heads `keep_q` and kv heads `keep_kv` (in order), every kv head serving the same count."""
    attn, dim = block.get_submodule(projections.attention), head_dim(block, projections)
    if not keep_q or not keep_kv or len(keep_q) % len(keep_kv):
        raise ValueError(f"cannot keep {len(keep_q)} q heads over {len(keep_kv)} kv heads")
    q_rows, kv_rows = head_rows(keep_q, dim), head_rows(keep_kv, dim)
    for part, rows, dim_ in (("q", q_rows, 0), ("k", kv_rows, 0), ("v", kv_rows, 0), ("o", q_rows, 1)):
        _replace(block, part, rows, dim_, projections)
    # The attention forward reads head counts from the weights, except the q-per-kv ratio.
    attn.num_key_value_groups = len(keep_q) // len(keep_kv)
    for name, value in (("num_heads", len(keep_q)), ("num_key_value_heads", len(keep_kv))):
        if hasattr(attn, name):
            setattr(attn, name, value)


def keep_channels(
    block: nn.Module, keep: list[int] | torch.Tensor, projections: Projections = LLAMA_PROJECTIONS
) -> None:
    """Keep MLP channels `keep`: gate/up output rows and down_proj input columns."""
    mlp = block.get_submodule(projections.mlp)
    index = torch.as_tensor(keep, dtype=torch.long)
    for part, dim in (("gate", 0), ("up", 0), ("down", 1)):
        _replace(block, part, index, dim, projections)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(index)


def reshape_block(block: nn.Module, shape: BlockShape, projections: Projections = LLAMA_PROJECTIONS) -> None:
    """Give a freshly built block the widths `shape` (the loader fills in the weights afterwards)."""
    current = block_shape(block, projections)
    if shape.heads != current.heads or shape.kv_heads != current.kv_heads:
        per_kv = shape.heads // shape.kv_heads
        keep_kv = list(range(shape.kv_heads))
        old_per_kv = current.heads // current.kv_heads
        keep_q = [kv * old_per_kv + i for kv in keep_kv for i in range(per_kv)]
        keep_attention(block, keep_q, keep_kv, projections)
    if shape.intermediate_size != current.intermediate_size:
        keep_channels(block, list(range(shape.intermediate_size)), projections)
