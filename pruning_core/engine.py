"""Block-sequential pruning engine.

The model stays where it was loaded (CPU); one block at a time moves to `device`. For block i:
hooks accumulate input statistics over the calibration samples, the block's linears are pruned,
then the block is re-run with its pruned weights and its outputs become the inputs of block i+1.
Samples go through a block in batches bounded by a memory budget; a statistics pass stops as soon
as every observed input of its stage has been seen, and methods that need no statistics observe one
sample only (for the reconstruction-error probe).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.adapters import ArchitectureAdapter, adapter_for, check_sequence_length, to_device
from pruning_core.blocks import InputTap, LinearGroup, StageMember, StageSeen, capture_block_inputs, run_block
from pruning_core.experts import EXPERT_SIDES, ExpertObserver, prune_experts
from pruning_core.masks import SparsityTarget
from pruning_core.methods import METHODS, LayerProblem
from pruning_core.recipe import Recipe
from pruning_core.reconstruct import reconstruct_block
from pruning_core.report import BlockReconstructionReport, ExpertUsage
from pruning_core.stats import InputStatistics, StatisticsPlan, relative_output_error

log = logging.getLogger(__name__)

# Activations of one batched block forward, by device type. Measured on SmolLM2 (64 x 512 calibration, 2 cores):
# a CPU block forward is fastest at ~4 samples per call (1.17 s vs 1.84 s one at a time, 1.70 s at 40), as
# larger batches fall out of cache; a GPU wants as many as fit.
DEFAULT_FORWARD_BUDGET_MIB = {"cpu": 128, "cuda": 4096}


def forward_budget(device: torch.device | str, budget_mib: int | None) -> int:
    """The given budget, or the device type's default."""
    return budget_mib if budget_mib is not None else DEFAULT_FORWARD_BUDGET_MIB.get(torch.device(device).type, 1024)


_ACTIVATION_COPIES = 8  # live tensors of the widest linear's width during a block forward, per token


def samples_per_forward(block: nn.Module, inputs: torch.Tensor, budget_mib: int) -> int:
    """How many calibration samples one block forward may take within `budget_mib` of activations.

    Estimated from the widest linear of the block: a few float32 tensors of that width per token.
    Depends only on shapes, so a resumed prune batches exactly like the uninterrupted one.
    """
    widest = max(
        [max(m.in_features, m.out_features) for m in block.modules() if isinstance(m, nn.Linear)] + [inputs.shape[-1]]
    )
    tokens = inputs.shape[1] if inputs.dim() > 2 else 1
    per_sample = tokens * widest * 4 * _ACTIVATION_COPIES
    return max(1, min(len(inputs), budget_mib * 2**20 // per_sample))


@dataclass
class BlockResult:
    """What the engine hands to `on_block` after block `index` is pruned."""

    index: int
    state_dict: dict[str, torch.Tensor]
    next_inputs: torch.Tensor
    errors: dict[str, float]
    seconds: float
    experts: dict[str, ExpertUsage] = field(default_factory=dict)  # fused experts weights of the block
    reconstruction: BlockReconstructionReport | None = None  # with the recipe's `block_reconstruction`


@dataclass
class PruneSummary:
    blocks: int
    start_block: int
    errors: dict[str, float] = field(default_factory=dict)
    experts: dict[str, ExpertUsage] = field(default_factory=dict)
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)  # statistics, solve, reconstruct, forward
    linear_seconds: dict[str, float] = field(default_factory=dict)  # the solve of each linear
    reconstruction: dict[int, BlockReconstructionReport] = field(default_factory=dict)  # block -> its refit


@contextlib.contextmanager
def deterministic_kernels(device: torch.device | str) -> Iterator[None]:
    """On CUDA, torch's deterministic kernels where it has them, so a resumed prune is bit-identical."""
    if torch.device(device).type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS reductions
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


class PhaseClock:
    """Seconds per phase of the prune and per linear's solve; waits for the GPU so the times are real."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.phases: dict[str, float] = {"statistics": 0.0, "solve": 0.0, "reconstruct": 0.0, "forward": 0.0}
        self.linears: dict[str, float] = {}

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str, linear: str | None = None) -> Iterator[None]:
        started = self._now()
        try:
            yield
        finally:
            elapsed = self._now() - started
            self.phases[name] += elapsed
            if linear is not None:
                self.linears[linear] = elapsed


def _matches(name: str, patterns: list[str] | dict[str, float]) -> str | None:
    for pattern in patterns:
        if name == pattern or fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


HESSIAN = StatisticsPlan()
# The share of every statistics batch's tokens that judges a ridge-regularised refit (refit_ridge: heldout).
HELDOUT_FRACTION = 0.25


def layer_target(recipe: Recipe, name: str, block_sparsity: float | None = None) -> SparsityTarget | None:
    """The target of one linear (full module name), or None when it is skipped.

    A per-layer override wins over the block's allocated sparsity (OWL), which wins over the recipe's.
    """
    if _matches(name, recipe.skip):
        return None
    override = _matches(name, recipe.layer_sparsity)
    if override is not None:
        return SparsityTarget(ratio=recipe.layer_sparsity[override])
    if block_sparsity is not None:
        return SparsityTarget(ratio=block_sparsity)
    return recipe.target


class GroupObserver(StageMember):
    """Forward hook feeding one group's input into its statistics, plus a sample for error estimates."""

    def __init__(
        self,
        block: nn.Module,
        tap: InputTap,
        device: torch.device | str,
        statistics: StatisticsPlan,
        stage: list[bool] | None,
        sample_tokens: int,
    ) -> None:
        self.tap = tap
        self.sample_tokens = sample_tokens
        self.stats: InputStatistics | None = None
        self.sample: torch.Tensor | None = None
        self.device = device
        self.statistics = statistics
        self.join(stage)
        self.handle = block.get_submodule(tap.module).register_forward_hook(self._observe)

    def _observe(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0] if self.tap.side == "input" else output
        if self.tap.columns is not None:
            x = x[..., self.tap.columns[0] : self.tap.columns[1]]
        x = x.detach().reshape(-1, x.shape[-1])  # some families flatten tokens before a linear
        if self.stats is None:
            self.stats = self.statistics.start(x.shape[-1], self.device)
            # The first calibration sample's tokens: the reconstruction-error probe.
            self.sample = x[: self.sample_tokens].to(torch.float32, copy=True)
        self.stats.add_batch(x)
        self.seen()


def observe_groups(
    adapter: ArchitectureAdapter,
    block: nn.Module,
    groups: list[LinearGroup],
    inputs: torch.Tensor,
    block_kwargs: dict[str, Any],
    device: torch.device | str,
    batch: int,
    statistics: StatisticsPlan = HESSIAN,
    label: str = "",
    progress: bool = False,
    outputs: torch.Tensor | None = None,
) -> list[GroupObserver]:
    """Run the block over the calibration samples, `batch` at a time, with an observer on each group's input.

    Each forward stops once every observer has seen its input (later modules' outputs are not needed);
    given `outputs`, each runs to the end and writes the block's outputs there instead (one pass, for a
    block that is not changed between its statistics and its outputs).
    """
    stage: list[bool] | None = [] if outputs is None else None
    sample_tokens = inputs[0].numel() // inputs.shape[-1]
    observers = [
        (ExpertObserver if g.tap.side in EXPERT_SIDES else GroupObserver)(
            block, g.tap, device, statistics, stage, sample_tokens
        )
        for g in groups
    ]
    try:
        with adapter.statistics_mode(block), torch.no_grad():
            for start in tqdm(range(0, len(inputs), batch), desc=label, leave=False, disable=not progress):
                samples = slice(start, start + batch)
                if outputs is not None:
                    outputs[samples] = run_block(block, inputs[samples], block_kwargs)
                    continue
                stage[:] = [False] * len(stage)
                with contextlib.suppress(StageSeen):
                    run_block(block, inputs[samples], block_kwargs)
    finally:
        for observer in observers:
            observer.remove()
    return observers


class BlockPruner:
    """Prunes the linears of one block given its calibration inputs."""

    def __init__(
        self,
        recipe: Recipe,
        adapter: ArchitectureAdapter,
        model: nn.Module,
        device: torch.device | str,
        block_sparsity: list[float] | None = None,
        clock: PhaseClock | None = None,
    ):
        self.clock = clock or PhaseClock(device)
        self.recipe = recipe
        self.block_sparsity = block_sparsity
        self.method = METHODS[recipe.method]
        self.settings = recipe.method_settings()  # what the method reads of the recipe, once per prune
        self.adapter = adapter
        self.device = device

    def statistics_plan(self) -> StatisticsPlan:
        """The method's statistics, with a held-out split of the tokens where its settings ask for one."""
        heldout = HELDOUT_FRACTION if self.settings.needs_heldout() else 0.0
        return StatisticsPlan(hessian=self.method.needs == "hessian", heldout_fraction=heldout)

    def prune(
        self,
        index: int,
        block: nn.Module,
        inputs: torch.Tensor,
        block_kwargs: dict[str, Any],
        progress: bool,
        batch: int,
    ) -> tuple[dict[str, float], dict[str, ExpertUsage]]:
        """Prune the block's linears; `batch` samples go through the block per statistics forward.

        Returns each linear's relative output error, and the routed tokens of each fused experts weight.
        """
        errors: dict[str, float] = {}
        experts: dict[str, ExpertUsage] = {}
        prefix = self.adapter.block_prefix(index)
        groups = self.adapter.groups(block, inputs, block_kwargs)
        stages = [[g] for g in groups] if self.recipe.true_sequential else [groups]
        # Without statistics to collect, one sample feeds the reconstruction-error probe.
        observed = inputs if self.method.needs != "nothing" else inputs[:1]
        sparsity = self.block_sparsity[index] if self.block_sparsity is not None else None
        for stage in stages:
            with self.clock.phase("statistics"):
                observers = observe_groups(
                    self.adapter,
                    block,
                    stage,
                    observed,
                    block_kwargs,
                    device=self.device,
                    statistics=self.statistics_plan(),
                    label=f"block {index} statistics",
                    progress=progress,
                    batch=batch,
                )
            for group, observer in zip(stage, observers, strict=True):
                for relative in group.linears:
                    name = f"{prefix}.{relative}"
                    with self.clock.phase("solve", linear=name):
                        if isinstance(observer, ExpertObserver):
                            error, experts[name] = prune_experts(
                                observer, self.method, lambda w, st, n: self._problem(n, w, st, sparsity), name
                            )
                        else:
                            error = self._prune_linear(block.get_submodule(relative), name, observer, sparsity)
                    if error is not None:
                        errors[name] = error
                observer.stats = observer.expert_stats = None  # free the group's Hessians before the next one
        return errors, experts

    def _problem(
        self, name: str, dense: torch.Tensor, stats: InputStatistics | None, block_sparsity: float | None
    ) -> LayerProblem | None:
        """The layer's problem under the recipe (None: the recipe leaves it dense)."""
        target = layer_target(self.recipe, name.split("[", 1)[0], block_sparsity)
        if target is None:
            log.info("%s: skipped (left dense)", name)
            return None
        target.check_columns(dense.shape[1], name)
        return LayerProblem(
            name=name,
            weight=dense,
            stats=stats,
            target=target,
            block_size=self.recipe.block_size,
            damping=self.recipe.damping,
            settings=self.settings,
        )

    def _prune_linear(
        self, linear: nn.Linear, name: str, observer: GroupObserver, block_sparsity: float | None
    ) -> float | None:
        dense = linear.weight.data.to(torch.float32, copy=True)
        problem = self._problem(name, dense, observer.stats, block_sparsity)
        if problem is None:
            return None
        pruned = self.method.prune(problem)
        linear.weight.data.copy_(pruned.to(linear.weight.dtype))
        return relative_output_error(dense, pruned, observer.sample)


@torch.no_grad()
def block_outputs(
    block: nn.Module, inputs: torch.Tensor, block_kwargs: dict[str, Any], label: str, progress: bool, batch: int
) -> torch.Tensor:
    outputs = torch.empty_like(inputs)
    for start in tqdm(range(0, len(inputs), batch), desc=label, leave=False, disable=not progress):
        outputs[start : start + batch] = run_block(block, inputs[start : start + batch], block_kwargs)
    return outputs


def restore_blocks(model: nn.Module, block_states: list[dict[str, torch.Tensor]]) -> None:
    """Load saved weights into blocks 0..len(block_states)-1 (resume after a checkpoint)."""
    blocks = adapter_for(model).blocks(model)
    for index, state in enumerate(block_states):
        blocks[index].load_state_dict(state, strict=True)


def prune_model(
    model: nn.Module,
    calibration: torch.Tensor,
    recipe: Recipe,
    device: str = "cpu",
    start_block: int = 0,
    start_inputs: torch.Tensor | None = None,
    on_block: Callable[[BlockResult], None] | None = None,
    progress: bool = True,
    block_sparsity: list[float] | None = None,
    forward_budget_mib: int | None = None,
) -> PruneSummary:
    """Prune `model` in place, block by block, on calibration token ids (n_samples x seq_len).

    To resume at block k, load the pruned weights of blocks < k into `model` and pass
    `start_block=k` with `start_inputs` = the inputs of block k saved by `on_block` of block k-1.
    `block_sparsity` (one ratio per block, e.g. from OWL) replaces the recipe's uniform sparsity.
    `forward_budget_mib` bounds the activations of one batched block forward (None: the device's default).
    """
    started = time.perf_counter()
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    model.eval()
    if start_block and start_inputs is None:
        raise ValueError("resuming at a later block needs the saved inputs of that block")
    check_sequence_length(model, calibration.shape[-1], "calibration seq_len")
    # Each block's keyword arguments (its layer type's mask and rotary embeddings) depend only on the length.
    captured = capture_block_inputs(model, blocks, calibration[: 1 if start_block else None])
    inputs = (start_inputs if start_block else captured.hidden).to(device)
    memo: dict[int, Any] = {}  # a mask shared by blocks is moved to the device once
    clock = PhaseClock(device)
    forward_budget_mib = forward_budget(device, forward_budget_mib)
    pruner = BlockPruner(recipe, adapter, model, device, block_sparsity, clock)
    summary = PruneSummary(blocks=len(blocks), start_block=start_block)

    home = next(blocks[0].parameters()).device
    with deterministic_kernels(device):
        for index in tqdm(range(start_block, len(blocks)), desc=f"{recipe.method} blocks", disable=not progress):
            block_started = time.perf_counter()
            block = blocks[index].to(device)
            batch = samples_per_forward(block, inputs, forward_budget_mib)
            block_kwargs = to_device(captured.kwargs[index], device, memo)
            reconstruction = recipe.block_reconstruction
            if reconstruction is not None:
                with clock.phase("reconstruct"):
                    targets = block_outputs(block, inputs, block_kwargs, f"block {index} dense", progress, batch)
            errors, experts = pruner.prune(index, block, inputs, block_kwargs, progress, batch)
            if reconstruction is not None:
                with clock.phase("reconstruct"):
                    summary.reconstruction[index] = reconstruct_block(
                        block,
                        inputs,
                        targets,
                        block_kwargs,
                        spec=reconstruction,
                        seed=recipe.seed * 1_000_003 + index,
                        forward_batch=batch,
                    )
                del targets
            with clock.phase("forward"):
                inputs = block_outputs(block, inputs, block_kwargs, f"block {index} outputs", progress, batch)
            block.to(home)
            summary.errors.update(errors)
            summary.experts.update(experts)
            if on_block is not None:
                state = {k: v.detach().cpu() for k, v in blocks[index].state_dict().items()}
                seconds = time.perf_counter() - block_started
                refit = summary.reconstruction.get(index)
                on_block(BlockResult(index, state, inputs.cpu(), errors, seconds, experts, refit))
            log.info("block %d: mean relative error %.4g", index, sum(errors.values()) / max(len(errors), 1))
    summary.seconds = time.perf_counter() - started
    summary.phase_seconds = dict(clock.phases)
    summary.linear_seconds = dict(clock.linears)
    return summary
