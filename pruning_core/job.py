"""One prune or one evaluation end to end, as the CLI and the demo run them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pruning_core.data import calibration_windows, tokenize_text
from pruning_core.engine import BlockResult, prune_model
from pruning_core.modeling import cast_for_saving, save_model, saved_weight_names, sparsity_report
from pruning_core.owl import outlier_fractions, owl_sparsities
from pruning_core.perplexity import PerplexityResult, perplexity
from pruning_core.recipe import Recipe
from pruning_core.recovery import RecoveryResult, RecoverySpec, TrainingState, recover
from pruning_core.report import Provenance, PruneReport, StructureReport
from pruning_core.structured.llm_pruner import forward_latency_ms, prune_structured
from pruning_core.structured.storage import save_structured


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
    provenance: Provenance | None = None,
    start_block: int = 0,
    start_inputs: torch.Tensor | None = None,
    on_block: Callable[[BlockResult], None] | None = None,
    block_sparsity: list[float] | None = None,
    forward_budget_mib: int | None = None,
    save_dtype: torch.dtype | None = None,
) -> PruneReport:
    """Prune `model` in place, save it in Hugging Face format with `sparsity.json`; return that report.

    `start_block`, `start_inputs` and `on_block` are the engine's resume and checkpoint hooks;
    `block_sparsity` comes from `allocate_sparsity` (computed on the dense model);
    `forward_budget_mib` bounds the activations of one batched block forward (None: the device's default);
    `save_dtype`: the dtype the weights are saved in (None: the model's own).
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
        block_sparsity=block_sparsity,
        forward_budget_mib=forward_budget_mib,
    )
    save_model(model, tokenizer, out_dir, save_dtype)
    measured = sparsity_report(out_dir, saved_weight_names(model))
    report = PruneReport(
        **measured,
        recipe=recipe.model_dump(mode="json"),
        recipe_fingerprint=recipe.fingerprint(),
        provenance=provenance,
        reconstruction_error=summary.errors,
        experts=summary.experts,
        prune_seconds=summary.seconds,
        phase_seconds=summary.phase_seconds,
        block_sparsity=block_sparsity,
    )
    report.write(out_dir)
    return report


def allocate_sparsity(
    model: nn.Module, calibration_ids: torch.Tensor, recipe: Recipe, device: str = "cpu", progress: bool = True
) -> list[float] | None:
    """Per-block sparsity of the recipe's allocation (None for uniform); call it on the dense model."""
    if recipe.allocation != "owl":
        return None
    fractions = outlier_fractions(model, calibration_ids, recipe.owl_m, device, progress)
    return owl_sparsities(fractions, recipe.sparsity, recipe.owl_lambda)


def prune_structured_to_folder(
    model: nn.Module,
    tokenizer,
    calibration_ids: torch.Tensor,
    recipe: Recipe,
    out_dir: str | Path,
    device: str = "cpu",
    progress: bool = True,
    provenance: Provenance | None = None,
    statistics: dict[str, torch.Tensor] | None = None,
    latency_tokens: int = 128,
    save_dtype: torch.dtype | None = None,
) -> PruneReport:
    """LLM-Pruner on `model` in place; save the smaller model with `sparsity.json`; return that report.

    The report has parameters before/after, each block's widths and the CPU latency of a forward pass.
    """
    latency_before = forward_latency_ms(model, latency_tokens)
    result = prune_structured(model, calibration_ids, recipe.structured_settings(), device, progress, statistics)
    latency_after = forward_latency_ms(model, latency_tokens)
    with cast_for_saving(model, save_dtype):
        loads_with_from_pretrained = save_structured(model, tokenizer, out_dir)
    structure = StructureReport(
        parameters_before=result.parameters_before,
        parameters_after=result.parameters_after,
        block_share=result.block_share,
        block_shapes={str(k): v for k, v in result.layer_shapes().items()},
        latency_ms_before=latency_before,
        latency_ms_after=latency_after,
        latency_tokens=latency_tokens,
        loads_with_from_pretrained=loads_with_from_pretrained,
    )
    report = PruneReport(
        total=result.removed,
        parameters=result.parameters_after,
        recipe=recipe.model_dump(mode="json"),
        recipe_fingerprint=recipe.fingerprint(),
        provenance=provenance,
        prune_seconds=result.seconds,
        structure=structure,
    )
    report.write(out_dir)
    return report


def recover_to_folder(
    model: nn.Module,
    tokenizer,
    rows: list[str],
    spec: RecoverySpec,
    out_dir: str | Path,
    device: str = "cpu",
    progress: bool = True,
    start: TrainingState | None = None,
    on_checkpoint: Callable[[TrainingState], None] | None = None,
    checkpoint_every: int = 25,
    save_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, RecoveryResult]:
    """LoRA recovery on the rows of a data spec, merged and saved like any structurally pruned model."""
    tokens = tokenize_text(tokenizer, rows)
    merged, result = recover(model, tokens, spec, device, progress, start, on_checkpoint, checkpoint_every)
    with cast_for_saving(merged, save_dtype):
        save_structured(merged, tokenizer, out_dir)
    return merged, result


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
