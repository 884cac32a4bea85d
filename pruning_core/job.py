"""One prune or one evaluation end to end, as the CLI and the demo run them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pruning_core.data import calibration_windows, tokenize_text
from pruning_core.engine import BlockResult, prune_model
from pruning_core.modeling import prunable_weight_names, save_model, sparsity_report, write_report
from pruning_core.perplexity import PerplexityResult, perplexity
from pruning_core.recipe import Recipe


def calibration_set(tokenizer, rows: list[str], recipe: Recipe) -> torch.Tensor:
    """The recipe's calibration windows (samples x seq_len) drawn from the rows of a data spec."""
    return calibration_windows(tokenize_text(tokenizer, rows), recipe.calibration_samples, recipe.seq_len, recipe.seed)


def prune_to_folder(
    model: nn.Module,
    tokenizer,
    calibration_ids: torch.Tensor,
    recipe: Recipe,
    out_dir: str | Path,
    device: str = "cpu",
    progress: bool = True,
    details: dict | None = None,
    start_block: int = 0,
    start_inputs: torch.Tensor | None = None,
    on_block: Callable[[BlockResult], None] | None = None,
) -> dict:
    """Prune `model` in place, save it in Hugging Face format with `sparsity.json`; return that report.

    `start_block`, `start_inputs` and `on_block` are the engine's resume and checkpoint hooks.
    """
    summary = prune_model(
        model,
        calibration_ids,
        recipe,
        device=device,
        progress=progress,
        start_block=start_block,
        start_inputs=start_inputs,
        on_block=on_block,
    )
    save_model(model, tokenizer, out_dir)
    report = sparsity_report(out_dir, prunable_weight_names(model))
    report.update(
        details or {},
        recipe=recipe.model_dump(mode="json"),
        recipe_fingerprint=recipe.fingerprint(),
        reconstruction_error=summary.errors,
        prune_seconds=summary.seconds,
    )
    write_report(out_dir, report)
    return report


def evaluate_perplexities(
    model: nn.Module,
    tokenizer,
    datasets: dict[str, list[str]],
    seq_len: int,
    max_tokens: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, PerplexityResult]:
    """Perplexity on each named dataset (rows already read), same protocol for all."""
    return {
        name: perplexity(model, tokenize_text(tokenizer, rows), seq_len, max_tokens, device, name, progress)
        for name, rows in datasets.items()
    }
