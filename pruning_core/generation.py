"""A generation sanity check: greedy continuations of a few fixed prompts, to read side by side."""

from __future__ import annotations

import torch
from torch import nn

SANITY_PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
)


@torch.no_grad()
def greedy_continuations(
    model: nn.Module, tokenizer, prompts: tuple[str, ...] = SANITY_PROMPTS, new_tokens: int = 32, device: str = "cpu"
) -> dict[str, str]:
    """prompt -> the model's greedy continuation (deterministic, so dense and pruned outputs compare)."""
    model.eval()
    outputs = {}
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt").to(device)
        generated = model.generate(
            **encoded,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        outputs[prompt] = tokenizer.decode(generated[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return outputs
