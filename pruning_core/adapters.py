"""Architecture adapters: where a causal LM keeps its blocks and which linears share an input."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


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


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class ArchitectureAdapter:
    """How to walk one family of causal LMs block by block."""

    family: str
    blocks_path: str

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def groups(self, model: nn.Module) -> list[LinearGroup]:
        """Groups in true-sequential order."""
        raise NotImplementedError

    def linear_names(self, model: nn.Module) -> list[str]:
        return [name for group in self.groups(model) for name in group.linears]

    @contextlib.contextmanager
    def statistics_mode(self, block: nn.Module) -> Iterator[None]:
        """Context in which the block's forward passes through every tapped module."""
        yield


class LlamaAdapter(ArchitectureAdapter):
    def groups(self, model: nn.Module) -> list[LinearGroup]:
        return [
            LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), InputTap("self_attn.q_proj")),
            LinearGroup(("self_attn.o_proj",), InputTap("self_attn.o_proj")),
            LinearGroup(("mlp.gate_proj", "mlp.up_proj"), InputTap("mlp.gate_proj")),
            LinearGroup(("mlp.down_proj",), InputTap("mlp.down_proj")),
        ]


class OptAdapter(ArchitectureAdapter):
    def groups(self, model: nn.Module) -> list[LinearGroup]:
        return [
            LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), InputTap("self_attn.q_proj")),
            LinearGroup(("self_attn.out_proj",), InputTap("self_attn.out_proj")),
            LinearGroup(("fc1",), InputTap("fc1")),
            LinearGroup(("fc2",), InputTap("fc2")),
        ]


class MambaAdapter(ArchitectureAdapter):
    def groups(self, model: nn.Module) -> list[LinearGroup]:
        rank = self.blocks(model)[0].mixer.time_step_rank
        return [
            LinearGroup(("mixer.in_proj",), InputTap("mixer.in_proj")),
            LinearGroup(("mixer.x_proj",), InputTap("mixer.x_proj")),
            # The mixer multiplies by dt_proj.weight directly (and fuses it on CUDA), so a hook on
            # dt_proj never fires: its input is the first time_step_rank columns of x_proj's output.
            LinearGroup(("mixer.dt_proj",), InputTap("mixer.x_proj", side="output", columns=(0, rank))),
            LinearGroup(("mixer.out_proj",), InputTap("mixer.out_proj")),
        ]

    @contextlib.contextmanager
    def statistics_mode(self, block: nn.Module) -> Iterator[None]:
        # The fused training kernel skips x_proj/out_proj as modules; eval mode keeps the torch path.
        was_training = block.training
        block.eval()
        try:
            yield
        finally:
            block.train(was_training)


ADAPTERS: dict[str, ArchitectureAdapter] = {
    "llama": LlamaAdapter("llama", "model.layers"),
    "mistral": LlamaAdapter("mistral", "model.layers"),
    "qwen2": LlamaAdapter("qwen2", "model.layers"),
    "opt": OptAdapter("opt", "model.decoder.layers"),
    "mamba": MambaAdapter("mamba", "backbone.layers"),
}


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


# Keyword arguments a block gets from its model that must not be replayed (caches are per call).
_DROPPED_KWARGS = {"past_key_value", "past_key_values", "cache", "cache_params", "use_cache", "output_attentions"}


class _StopForward(Exception):
    pass


def to_device(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_first_block_inputs(
    model: nn.Module, adapter: ArchitectureAdapter, tokens: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the model's embeddings on each row of `tokens` and stop at block 0.

    Returns the hidden states entering block 0 (n x seq x hidden, on the model's device) and the
    keyword arguments the model passes to its blocks (masks, positions, rotary embeddings), which
    are the same for every sample since all rows have the same length and no padding.
    """
    first = adapter.blocks(model)[0]
    captured: list[torch.Tensor] = []
    block_kwargs: dict[str, Any] = {}

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(hidden.detach())
        block_kwargs.clear()
        block_kwargs.update({k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS and k != "hidden_states"})
        raise _StopForward

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for row in tokens:
            with contextlib.suppress(_StopForward):
                model(input_ids=row.unsqueeze(0), use_cache=False)
    finally:
        handle.remove()
    return torch.cat(captured), block_kwargs


def run_block(block: nn.Module, hidden: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
    output = block(hidden, **block_kwargs)
    return output[0] if isinstance(output, tuple) else output


def check_sequence_length(model: nn.Module, seq_len: int, what: str) -> None:
    """Refuse windows longer than the model's position range (its outputs there are meaningless)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"{what} {seq_len} exceeds the model's maximum of {limit} positions")
