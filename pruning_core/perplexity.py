"""Perplexity with the standard protocol: join rows with blank lines, tokenize once, score
non-overlapping windows of seq_len, exp of the mean NLL over every predicted token."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.adapters import check_sequence_length


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    seq_len: int
    windows: int
    tokens_scored: int  # tokens in the scored windows
    tokens_available: int


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seq_len: int,
    max_tokens: int | None = None,
    device: str = "cpu",
    label: str = "perplexity",
    progress: bool = True,
) -> PerplexityResult:
    check_sequence_length(model, seq_len, f"{label}: seq_len")
    available = token_ids.numel()
    usable = available if max_tokens is None else min(available, max_tokens)
    windows = usable // seq_len
    if windows == 0:
        raise ValueError(f"{label}: {usable} tokens are fewer than one window of seq_len={seq_len}")
    model.eval()
    total_nll = 0.0
    predicted = 0
    for w in tqdm(range(windows), desc=label, leave=False, disable=not progress):
        window = token_ids[w * seq_len : (w + 1) * seq_len].unsqueeze(0).to(device)
        logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
        nll = nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum")
        total_nll += float(nll)
        predicted += seq_len - 1
    return PerplexityResult(math.exp(total_nll / predicted), seq_len, windows, windows * seq_len, available)
