"""Architecture adapters: where a causal LM keeps its blocks, and the few families that need more."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pruning_core.blocks import InputTap, LinearGroup, block_experts, block_linears, discover_groups


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Projections:
    """Where a Llama-like block keeps the projections structured pruning couples (paths relative to the block):
    q/k/v output rows with o input columns per head, gate/up output rows with down input columns per channel."""

    attention: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def path(self, part: str) -> str:
        """`q` -> `self_attn.q_proj`, `down` -> `mlp.down_proj`."""
        owner = self.attention if part in ("q", "k", "v", "o") else self.mlp
        return f"{owner}.{getattr(self, part)}"

    @property
    def parts(self) -> tuple[str, ...]:
        return ("q", "k", "v", "o", "gate", "up", "down")

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self.path(part) for part in self.parts)

    @property
    def leaves(self) -> tuple[str, ...]:
        """The projections' own module names (what LoRA targets)."""
        return tuple(getattr(self, part) for part in self.parts)


LLAMA_PROJECTIONS = Projections()
# Families whose blocks couple heads and channels exactly as Llama does (q/k norms, where present, act per
# head on head_dim and survive removing heads); others (fused qkv as Phi-3, OLMo 2's norms over all heads)
# are refused by llm_pruner.
STRUCTURED_PROJECTIONS = {
    family: LLAMA_PROJECTIONS for family in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
}


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where a causal LM keeps its blocks; the linears of each block are discovered from its forward."""

    family: str
    blocks_path: str
    projections: Projections | None = None  # structured pruning's coupled projections, where supported

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def groups(self, block: nn.Module, hidden: torch.Tensor, block_kwargs: dict[str, Any]) -> list[LinearGroup]:
        """The block's groups in true-sequential order."""
        return discover_groups(block, hidden, block_kwargs)

    def linear_names(self, block: nn.Module) -> list[str]:
        """Every prunable linear of the block (relative names; a fused experts weight counts as one),
        whether or not the forward calls it as a module."""
        fused = [f"{name}.{weight}" for name in block_experts(block) for weight in ("gate_up_proj", "down_proj")]
        return [*block_linears(block), *fused]

    def weight_names(self, block: nn.Module) -> list[str]:
        """The parameters those linears prune, relative to the block."""
        linears = block_linears(block)
        return [f"{name}.weight" if name in linears else name for name in self.linear_names(block)]

    @contextlib.contextmanager
    def statistics_mode(self, block: nn.Module) -> Iterator[None]:
        """Context in which the block's forward passes through every tapped module."""
        yield


class MambaAdapter(ArchitectureAdapter):
    def groups(self, block: nn.Module, hidden: torch.Tensor, block_kwargs: dict[str, Any]) -> list[LinearGroup]:
        with self.statistics_mode(block):
            found = discover_groups(block, hidden, block_kwargs)
        # The mixer multiplies by dt_proj.weight directly (and fuses it on CUDA), so dt_proj is never called
        # as a module: its input is the first time_step_rank columns of x_proj's output.
        rank = block.mixer.time_step_rank
        dt = LinearGroup(("mixer.dt_proj",), InputTap("mixer.x_proj", side="output", columns=(0, rank)))
        after = next(i for i, g in enumerate(found) if "mixer.x_proj" in g.linears) + 1
        return [*found[:after], dt, *found[after:]]

    @contextlib.contextmanager
    def statistics_mode(self, block: nn.Module) -> Iterator[None]:
        # The fused training kernel skips x_proj/out_proj as modules; eval mode keeps the torch path.
        was_training = block.training
        block.eval()
        try:
            yield
        finally:
            block.train(was_training)


# Only families that need something the generic path cannot see.
SPECIAL_ADAPTERS: dict[str, type[ArchitectureAdapter]] = {"mamba": MambaAdapter}


def find_blocks_path(model: nn.Module) -> str | None:
    """The ModuleList of decoder blocks: of the model's `_no_split_modules` class, else the longest list of
    same-class modules holding linears."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1
    ]
    for name, module in lists:
        if type(module[0]).__name__ in no_split:
            return name
    with_linears = [(n, m) for n, m in lists if any(isinstance(x, nn.Linear) for x in m[0].modules())]
    return max(with_linears, key=lambda item: len(item[1]))[0] if with_linears else None


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    path = find_blocks_path(model)
    if path is None:
        raise UnsupportedArchitecture(f"unsupported architecture {family!r}: no list of decoder blocks found in it")
    if not block_linears(model.get_submodule(path)[0]):
        raise UnsupportedArchitecture(
            f"unsupported architecture {family!r}: its blocks ({path}) hold no torch.nn.Linear layers to prune"
        )
    return SPECIAL_ADAPTERS.get(family, ArchitectureAdapter)(family, path, STRUCTURED_PROJECTIONS.get(family))


def to_device(value: Any, device: torch.device | str, memo: dict[int, Any] | None = None) -> Any:
    """`value` with its tensors on `device`; a tensor met twice (a mask shared by blocks) is moved once."""
    memo = {} if memo is None else memo
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, memo) for k, v in value.items()}
    return value


def check_sequence_length(model: nn.Module, seq_len: int, what: str) -> None:
    """Refuse windows longer than the model's position range (its outputs there are meaningless)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"{what} {seq_len} exceeds the model's maximum of {limit} positions")
