"""A loaded model pruned (block by block, or structurally), recovered or evaluated, into a folder with its report:
what the pipeline's stages (`tasks.prune`, `tasks.recover`) and the benchmarks call."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pruning_core.adapters import adapter_for
from pruning_core.data import calibration_windows, tokenize_text
from pruning_core.distill import DistillSpec, distill
from pruning_core.engine import BlockResult, prune_model
from pruning_core.footprint import footprint
from pruning_core.modeling import cast_for_saving, save_model, saved_weight_names, sparsity_report
from pruning_core.owl import outlier_fractions, owl_sparsities
from pruning_core.perplexity import PerplexityResult, perplexity
from pruning_core.recipe import Recipe
from pruning_core.recovery import RecoveryResult, RecoverySpec, TrainingState, recover
from pruning_core.report import ParameterCounts, Provenance, PruneReport, ResumedBlocks, RunFacts, StructureReport
from pruning_core.structured.depth import prune_depth
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
    run: RunFacts | None = None,
    resumed: ResumedBlocks | None = None,
) -> PruneReport:
    """Prune `model` in place, save it in Hugging Face format with `sparsity.json`; return that report.

    `start_block`, `start_inputs` and `on_block` are the engine's resume and checkpoint hooks, and `resumed`
    what the blocks before `start_block` measured; `block_sparsity` comes from `allocate_sparsity` (computed
    on the dense model); `forward_budget_mib` bounds the activations of one batched block forward (None: the
    device's default); `save_dtype`: the dtype the weights are saved in (None: the model's own); `run`: how
    and where the prune ran, as its runner knows it.
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
    resumed = resumed or ResumedBlocks()
    errors = {**resumed.errors, **summary.errors}
    report = PruneReport(
        **measured,
        **dict(run or RunFacts()),
        recipe=recipe.model_dump(mode="json"),
        recipe_fingerprint=recipe.fingerprint(),
        provenance=provenance,
        reconstruction_error=errors,
        block_errors=block_means(model, errors),
        experts={**resumed.experts, **summary.experts},
        prune_seconds=summary.seconds,
        phase_seconds=summary.phase_seconds,
        block_sparsity=block_sparsity,
        block_reconstruction={**resumed.refits, **summary.reconstruction},
    )
    report.write(out_dir)
    return report


def block_means(model: nn.Module, errors: dict[str, float]) -> list[float]:
    """The mean relative reconstruction error of each block's linears (0 for a block without any)."""
    adapter = adapter_for(model)
    means = []
    for index in range(len(adapter.blocks(model))):
        values = [v for k, v in errors.items() if k.startswith(adapter.block_prefix(index) + ".")]
        means.append(sum(values) / len(values) if values else 0.0)
    return means


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
    run: RunFacts | None = None,
) -> PruneReport:
    """Width (llm_pruner) or depth pruning of `model` in place; save the smaller model with `sparsity.json`.

    The report has parameters before/after (decoder, embeddings, all), each block's widths or the blocks
    removed, and the CPU latency of a forward pass. `statistics`: llm_pruner's gradient statistics, or
    depth's block importance under the key `block_importance`.
    """
    latency_before = forward_latency_ms(model, latency_tokens)
    counts_before = parameter_counts(model)
    if recipe.method == "depth":
        importance = None if statistics is None else statistics["block_importance"].tolist()
        depth = prune_depth(model, calibration_ids, recipe.depth_settings(), device, progress, importance)
        seconds, block_share, shapes = depth.seconds, len(depth.removed) / len(depth.importance), {}
        removed_blocks, block_importance = depth.removed, depth.importance
    else:
        result = prune_structured(model, calibration_ids, recipe.structured_settings(), device, progress, statistics)
        seconds, block_share = result.seconds, result.block_share
        shapes = {str(k): v for k, v in result.layer_shapes().items()}
        removed_blocks, block_importance = [], []
    latency_after = forward_latency_ms(model, latency_tokens)
    with cast_for_saving(model, save_dtype):
        loads_with_from_pretrained = save_structured(model, tokenizer, out_dir)
    counts_after = parameter_counts(model)
    structure = StructureReport(
        parameters_before=counts_before.total,
        parameters_after=counts_after.total,
        counts_before=counts_before,
        counts_after=counts_after,
        ratio_of=recipe.ratio_of,
        block_share=block_share,
        block_shapes=shapes,
        removed_blocks=removed_blocks,
        block_importance=block_importance,
        latency_ms_before=latency_before,
        latency_ms_after=latency_after,
        latency_tokens=latency_tokens,
        loads_with_from_pretrained=loads_with_from_pretrained,
    )
    counted = "total" if recipe.ratio_of == "all" else "decoder"
    report = PruneReport(
        **dict(run or RunFacts()),
        total=1 - getattr(counts_after, counted) / getattr(counts_before, counted),
        parameters=counts_after.total,
        recipe=recipe.model_dump(mode="json"),
        recipe_fingerprint=recipe.fingerprint(),
        provenance=provenance,
        prune_seconds=seconds,
        structure=structure,
    )
    report.write(out_dir)
    return report


def parameter_counts(model: nn.Module) -> ParameterCounts:
    counts = footprint(model)
    return ParameterCounts(
        total=counts.parameters, embeddings=counts.embedding_parameters, decoder=counts.decoder_parameters
    )


def recover_to_folder(
    model: nn.Module,
    tokenizer,
    rows: list[str],
    spec: RecoverySpec | DistillSpec,
    out_dir: str | Path,
    device: str = "cpu",
    progress: bool = True,
    start: TrainingState | None = None,
    on_checkpoint: Callable[[TrainingState], None] | None = None,
    checkpoint_every: int = 25,
    save_dtype: torch.dtype | None = None,
    teacher: nn.Module | None = None,
) -> tuple[nn.Module, RecoveryResult]:
    """LoRA or distillation recovery on the rows of a data spec, saved like any structurally pruned model.

    `teacher`: the dense model, which distillation needs.
    """
    tokens = tokenize_text(tokenizer, rows)
    hooks = {"start": start, "on_checkpoint": on_checkpoint, "checkpoint_every": checkpoint_every}
    if isinstance(spec, DistillSpec):
        if teacher is None:
            raise ValueError("distillation needs the dense model as its teacher")
        merged, result = distill(model, teacher, tokens, spec, device, progress, **hooks)
    else:
        merged, result = recover(model, tokens, spec, device, progress, **hooks)
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
