"""Mixture-of-experts layers: each expert is pruned on the tokens its router sent it.

transformers 5 keeps a block's experts fused, as 3-D parameters `gate_up_proj` (experts x 2I x H) and
`down_proj` (experts x H x I), called with (hidden_states, top_k_index, top_k_weights). Each expert's slice
is pruned as its own linear: `gate_up_proj[e]` with the statistics of the tokens routed to e, `down_proj[e]`
with `act(gate) * up` of those tokens under the expert's current (already pruned) gate/up weights. An expert
that received fewer than `MIN_EXPERT_TOKENS` tokens has too little data for a data-aware method: it is pruned
by magnitude at the same target instead (logged, and counted in the report). Routers stay dense.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional

from pruning_core.blocks import InputTap, StageMember
from pruning_core.methods import METHODS, LayerProblem, Method
from pruning_core.report import ExpertUsage
from pruning_core.stats import InputStatistics, StatisticsPlan, relative_output_error

log = logging.getLogger(__name__)

MIN_EXPERT_TOKENS = 16
EXPERT_SIDES = {"experts": "gate_up_proj", "experts_mid": "down_proj"}  # tap side -> the weight it feeds


class ExpertObserver(StageMember):
    """Pre-forward hook on a fused experts module: per-expert statistics of the tokens routed to each."""

    def __init__(
        self,
        block: nn.Module,
        tap: InputTap,
        device: torch.device | str,
        statistics: StatisticsPlan,
        stage: list[bool] | None,
        sample_tokens: int,
    ) -> None:
        self.tap, self.device, self.statistics = tap, device, statistics
        self.experts = block.get_submodule(tap.module)
        count = self.experts.gate_up_proj.shape[0]
        self.expert_stats: list[InputStatistics | None] = [None] * count
        self.tokens = [0] * count
        self.samples: list[torch.Tensor | None] = [None] * count
        self.sample_tokens = sample_tokens
        self.stats = None  # the engine frees group statistics through this name
        self.join(stage)
        self.handle = self.experts.register_forward_pre_hook(self._observe)

    def _observe(self, module: nn.Module, args: tuple) -> None:
        hidden, routed = args[0], args[1]
        hidden = hidden.detach().reshape(-1, hidden.shape[-1])
        for expert in range(len(self.tokens)):
            rows = (routed == expert).any(dim=-1).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            x = hidden[rows]
            if self.tap.side == "experts_mid":
                gate, up = functional.linear(x, module.gate_up_proj[expert]).chunk(2, dim=-1)
                x = module.act_fn(gate) * up
            if self.expert_stats[expert] is None:
                self.expert_stats[expert] = self.statistics.start(x.shape[-1], self.device)
                self.samples[expert] = x[: self.sample_tokens].to(torch.float32, copy=True)
            self.expert_stats[expert].add_batch(x)
            self.tokens[expert] += rows.numel()
        self.seen()


def prune_experts(
    observer: ExpertObserver, method: Method, make_problem, name: str
) -> tuple[float | None, ExpertUsage]:
    """Prune every expert's slice of the weight `observer` feeds; the mean relative error over experts seen.

    `make_problem(weight, stats, expert_name)` builds the expert's LayerProblem, or None to leave it dense.
    """
    weight = getattr(observer.experts, EXPERT_SIDES[observer.tap.side])
    errors, fallback = [], []
    for expert, stats in enumerate(observer.expert_stats):
        dense = weight.data[expert].to(torch.float32, copy=True)
        problem: LayerProblem | None = make_problem(dense, stats, f"{name}[{expert}]")
        if problem is None:
            continue
        chosen = method
        if method.needs != "nothing" and observer.tokens[expert] < MIN_EXPERT_TOKENS:
            log.warning(
                "%s[%d]: %d routed tokens (< %d): pruned by magnitude",
                name,
                expert,
                observer.tokens[expert],
                MIN_EXPERT_TOKENS,
            )
            fallback.append(expert)
            chosen = METHODS["magnitude"]
        pruned = chosen.prune(problem)
        weight.data[expert].copy_(pruned.to(weight.dtype))
        if observer.samples[expert] is not None:
            errors.append(relative_output_error(dense, pruned, observer.samples[expert]))
    usage = ExpertUsage(tokens=list(observer.tokens), fallback=fallback)
    return (sum(errors) / len(errors) if errors else None), usage
