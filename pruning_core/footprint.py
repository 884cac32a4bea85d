"""What a model costs to hold, counted on the model as loaded: parameters (decoder and embeddings) and the
bytes of its tensors; and a variant's gains over its dense model from such measures.

Zeros do not count as savings here: an unstructured or N:M variant keeps every weight (as zeros) in a
dense tensor, so its parameters and bytes are dense's. Only removed heads, channels or blocks shrink them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

# Measures where less is better (a gain is dense / variant); the others are throughputs (variant / dense).
SMALLER_IS_BETTER = ("size_mib", "loaded_mib", "params.total")
THROUGHPUT = "_tok_s."  # prefill_tok_s.b1, decode_tok_s.b8 (not ms per token: the same measure inverted)


class Footprint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    parameters: int
    decoder_parameters: int  # everything but the embeddings
    embedding_parameters: int  # input embeddings and output head; tied weights once
    loaded_mib: float  # all parameters and buffers as loaded (their dtype and device), each tensor once

    def metrics(self) -> dict[str, float]:
        """The fields under their tracked names."""
        return {
            "params.total": float(self.parameters),
            "params.decoder": float(self.decoder_parameters),
            "params.embeddings": float(self.embedding_parameters),
            "loaded_mib": self.loaded_mib,
        }


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor once: tied weights are one Parameter, but a buffer may alias another's storage."""
    seen, out = set(), []
    for tensor in tensors:
        key = (tensor.device, tensor.data_ptr(), tensor.numel()) if tensor.data_ptr() else id(tensor)
        if key not in seen:
            seen.add(key)
            out.append(tensor)
    return out


def footprint(model: nn.Module) -> Footprint:
    """Parameters and loaded bytes of `model` (a transformers causal LM, or any module with embeddings)."""
    parameters = _unique(model.parameters())
    embedding_modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    embeddings = _unique(p for module in embedding_modules if module is not None for p in module.parameters())
    total = sum(p.numel() for p in parameters)
    embedded = sum(p.numel() for p in embeddings)
    tensors = _unique([*parameters, *model.buffers()])
    return Footprint(
        parameters=total,
        decoder_parameters=total - embedded,
        embedding_parameters=embedded,
        loaded_mib=sum(t.numel() * t.element_size() for t in tensors) / 2**20,
    )


def gains(variant: Mapping[str, float], dense: Mapping[str, float]) -> dict[str, float]:
    """x dense for every measure both have (above 1: the variant gains): throughputs variant / dense, sizes
    and parameter counts dense / variant. Measures missing, zero or not comparable are left out."""
    out = {}
    for key, value in variant.items():
        base = dense.get(key)
        if base is None or not (value > 0 and base > 0):  # NaN fails too
            continue
        if key in SMALLER_IS_BETTER:
            out[key] = base / value
        elif THROUGHPUT in key:
            out[key] = value / base
    return out
