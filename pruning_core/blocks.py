"""What the engine needs to know about a model's blocks, learned from the model itself.

- `BlockInputs`: the hidden states entering block 0 and, for every block, exactly the keyword arguments the
  model passes it (attention mask and rotary embeddings of that block's layer type, position ids, flags).
  They are caught by swapping each block for a `_Catcher` for one forward: the model's own code computes
  every block's arguments before (or while) it walks the blocks, so sliding-window and full-attention
  layers each get their own mask, with nothing of a family's code copied here.
- `discover_groups`: the block's linears, which of them read the same input tensor (one Hessian serves a
  group) and their true-sequential order, observed with hooks on one forward of one sample.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Keyword arguments a block gets from its model that must not be replayed (caches are per call).
_DROPPED_KWARGS = {"past_key_value", "past_key_values", "cache", "cache_params", "use_cache", "output_attentions"}

# Mixture-of-experts routers stay dense: pruning them changes which expert a token goes to.
ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})


@dataclass
class BlockInputs:
    """Block 0's input hidden states (samples x seq x hidden) and each block's own keyword arguments.

    Arguments are shared objects where the model shares them (one mask per layer type), so holding one
    dict per block costs no more memory than the model's own forward.
    """

    hidden: torch.Tensor
    kwargs: list[dict[str, Any]] = field(default_factory=list)


class _Stop(Exception):
    pass


class StageSeen(Exception):
    """Raised by the last observer of a stage: the rest of the block's forward is not needed."""


class StageMember:
    """An observer of a true-sequential stage (`stage`: one "seen in this forward" flag per observer; None: never
    stop). The last one to see its input ends the forward."""

    stage: list[bool] | None
    handle: Any

    def join(self, stage: list[bool] | None) -> None:
        self.stage = stage
        if stage is not None:
            self.slot = len(stage)
            stage.append(False)

    def seen(self) -> None:
        if self.stage is not None:
            self.stage[self.slot] = True
            if all(self.stage):
                raise StageSeen

    def remove(self) -> None:
        self.handle.remove()


class _Catcher(nn.Module):
    """Stands in for block `index` during one forward: records what the model passes it, passes hidden on."""

    def __init__(self, index: int, last: bool, inputs: BlockInputs, hidden: list[torch.Tensor]) -> None:
        super().__init__()
        self.index, self.last, self.inputs, self.hidden = index, last, inputs, hidden
        self.attention_type = None  # some models read layer attributes; the real ones are copied in

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kept = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS and k != "hidden_states"}
        if self.index == 0:
            self.hidden.append(hidden.detach())
        if len(self.inputs.kwargs) <= self.index:
            self.inputs.kwargs.append(kept)
        if self.index == 0 and len(self.hidden) > 1:
            raise _Stop  # every block's arguments are known from the first row: only block 0's input is needed
        if self.last:
            raise _Stop
        return hidden


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor) -> BlockInputs:
    """Block 0's inputs for each row of `tokens`, and every block's keyword arguments (from the first row).

    All rows have the same length and no padding, so the arguments do not depend on the row.
    """
    inputs, hidden = BlockInputs(hidden=torch.empty(0)), []
    originals = list(blocks)
    for index, original in enumerate(originals):
        catcher = _Catcher(index, index == len(originals) - 1, inputs, hidden)
        for name in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(original, name):
                setattr(catcher, name, getattr(original, name))
        blocks[index] = catcher
    try:
        for row in tokens:
            with contextlib.suppress(_Stop):
                model(input_ids=row.unsqueeze(0), use_cache=False)
    finally:
        for index, original in enumerate(originals):
            blocks[index] = original
    inputs.hidden = torch.cat(hidden)
    return inputs


def run_block(block: nn.Module, hidden: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
    output = block(hidden, **block_kwargs)
    return output[0] if isinstance(output, tuple) else output


def block_experts(block: nn.Module) -> dict[str, nn.Module]:
    """Fused mixture-of-experts modules (3-D `gate_up_proj` and `down_proj`), by relative name."""
    return {
        name: module
        for name, module in block.named_modules()
        if all(getattr(getattr(module, p, None), "ndim", 0) == 3 for p in ("gate_up_proj", "down_proj"))
    }


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every linear of a block that may be pruned (routers excluded), by relative name."""
    return {
        name: module
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in ROUTER_NAMES
    }


@dataclass(frozen=True)
class InputTap:
    """Where a group's input is observed: a module's input, or a column slice of its output."""

    module: str
    side: str = "input"
    columns: tuple[int, int] | None = None


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one block that read the same input (one Hessian serves them all)."""

    linears: tuple[str, ...]
    tap: InputTap


@torch.no_grad()
def discover_groups(block: nn.Module, hidden: torch.Tensor, block_kwargs: dict[str, Any]) -> list[LinearGroup]:
    """The block's linears grouped by the input tensor they read, in the order the forward first calls them.

    A fused experts module gives two groups: its `gate_up_proj` (fed the routed tokens) and then its
    `down_proj` (fed each expert's activations). Linears the forward never calls as modules (Mamba's
    dt_proj) are not in the result; an adapter adds them.
    """
    seen: list[tuple[str, torch.Tensor]] = []  # the tensors are held, so their ids stay unique during the forward
    experts = block_experts(block)

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if args and all(name != other for other, _ in seen):
                seen.append((name, args[0]))

        return hook

    watched = {**block_linears(block), **experts}
    handles = [module.register_forward_pre_hook(record(name)) for name, module in watched.items()]
    try:
        run_block(block, hidden[:1], block_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    readers: dict[int, list[str]] = {}  # input tensor id -> the linears reading it
    order: list[tuple[str, str | int]] = []  # ("experts", module name) or ("linears", input tensor id)
    for name, tensor in seen:
        if name in experts:
            order.append(("experts", name))
        elif id(tensor) in readers:
            readers[id(tensor)].append(name)
        else:
            readers[id(tensor)] = [name]
            order.append(("linears", id(tensor)))
    groups = []
    for kind, key in order:
        if kind == "experts":
            groups.append(LinearGroup((f"{key}.gate_up_proj",), InputTap(key, side="experts")))
            groups.append(LinearGroup((f"{key}.down_proj",), InputTap(key, side="experts_mid")))
        else:
            groups.append(LinearGroup(tuple(readers[key]), InputTap(readers[key][0])))
    return groups
