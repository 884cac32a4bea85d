"""Which variant ships: a quality budget over measured metrics, and per model the variant that best meets
an objective within it (ties broken by quality). Pure logic over the batch report's rows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Objective = Literal["sparsity", "size_mib", "latency"]
AccuracyMetric = Literal["acc", "acc_norm"]

# A measured value this close to its limit counts as at the limit: 1.1 * ppl / ppl - 1 is 0.10000000000000009.
LIMIT_SLACK = 1e-9
# Objective values closer than this are a tie, broken by quality: sparsity absolute (2:4 vs 0.5 with a few
# dead columns), size and latency relative (a timing repeated differs by a few percent).
TIE = {"sparsity": 0.005, "size_mib": 0.01, "latency": 0.05}
LATENCY_METRIC = "decode_ms_per_token.b1"  # the latency objective: a decoding user's wait per token


class Budget(BaseModel):
    """The quality limits a variant must stay within; any combination, at least one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_ppl_increase: float | None = Field(
        default=None, ge=0.0, description="perplexity on `dataset` at most (1 + this) x dense"
    )
    dataset: str | None = Field(default=None, description="perplexity dataset label; default the first one")
    min_accuracy_retained: float | None = Field(
        default=None, gt=0.0, le=2.0, description="mean task accuracy at least this fraction of dense's"
    )
    max_task_drop: float | None = Field(
        default=None, ge=0.0, le=1.0, description="no task's accuracy more than this below dense (absolute)"
    )
    accuracy_metric: AccuracyMetric = Field(default="acc", description="acc | acc_norm (tasks without it: acc)")

    @model_validator(mode="after")
    def _some_limit(self) -> Budget:
        if self.max_ppl_increase is None and self.min_accuracy_retained is None and self.max_task_drop is None:
            raise ValueError("a budget needs max_ppl_increase, min_accuracy_retained or max_task_drop")
        if self.dataset is not None and self.max_ppl_increase is None:
            raise ValueError("'dataset' names where max_ppl_increase is measured; give max_ppl_increase")
        return self

    @property
    def needs_tasks(self) -> bool:
        return self.min_accuracy_retained is not None or self.max_task_drop is not None

    def describe(self) -> str:
        parts = []
        if self.max_ppl_increase is not None:
            parts.append(f"ppl {self.dataset or '(first dataset)'} <= dense x {1 + self.max_ppl_increase:g}")
        if self.min_accuracy_retained is not None:
            parts.append(f"mean {self.accuracy_metric} >= {self.min_accuracy_retained:g} x dense")
        if self.max_task_drop is not None:
            parts.append(f"every task's {self.accuracy_metric} >= dense - {self.max_task_drop:g}")
        return "; ".join(parts)


class SelectionSpec(Budget):
    """The batch file's `selection:` section: a budget, an objective, and whether the choice is registered."""

    objective: Objective = Field(default="sparsity", description="sparsity (most) | size_mib (least) | latency")
    registry: bool = Field(default=True, description="register the chosen variant in the MLflow Model Registry")

    def with_dataset(self, datasets: list[str]) -> SelectionSpec:
        """The budget's perplexity dataset made explicit (default: the first of the evaluation's)."""
        if self.max_ppl_increase is None or self.dataset is not None:
            return self
        return self.model_copy(update={"dataset": datasets[0]}) if datasets else self


class Variant(BaseModel):
    """What the budget and the objective read of one pruned variant (or of the dense model)."""

    recipe: str
    status: str = "FINISHED"
    sparsity: float | None = None
    perplexity: dict[str, float] = {}
    accuracy: dict[str, float] = {}  # "acc.piqa", "acc_norm.piqa", ...
    size_mib: float | None = None
    speed: dict[str, float] = {}
    run_id: str = ""
    dtype: str | None = None
    parameters: float | None = None  # all of them, tied embeddings once


class Check(BaseModel):
    """One limit of the budget applied to one variant."""

    limit: str  # max_ppl_increase | min_accuracy_retained | max_task_drop
    subject: str  # the dataset, "mean acc" or the task
    measured: float
    allowed: float
    passed: bool

    def describe(self) -> str:
        over = self.measured - self.allowed
        if self.limit == "min_accuracy_retained":
            return f"{self.limit} {self.subject}: {self.measured:.4f} < {self.allowed:g} (short by {-over:.4f})"
        return f"{self.limit} {self.subject}: {self.measured:.4f} > {self.allowed:g} (over by {over:.4f})"


class Verdict(BaseModel):
    recipe: str
    run_id: str = ""
    checks: list[Check] = []
    problem: str | None = None  # why the budget could not be applied (failed run, metric missing)
    objective_value: float | None = None
    gain: float | None = None  # size or latency objective: x dense (dense / variant; above 1 it gains)
    no_gain: str | None = None  # why a variant within budget still cannot ship: no real gain over dense

    @property
    def within_budget(self) -> bool:
        """The quality budget alone (what a sparsity search bisects on)."""
        return self.problem is None and all(check.passed for check in self.checks)

    @property
    def eligible(self) -> bool:
        """Within budget, its objective measured and, for size or latency, really better than dense."""
        return self.within_budget and self.objective_value is not None and self.no_gain is None

    def why_not(self) -> str:
        if self.problem is not None:
            return self.problem
        failed = [check.describe() for check in self.checks if not check.passed]
        return "; ".join(failed + ([self.no_gain] if self.no_gain else []))


class ModelChoice(BaseModel):
    model: str
    chosen: str | None  # recipe name of the variant that ships, None when none is within budget
    run_id: str | None = None
    verdicts: list[Verdict]

    def why_none(self) -> str:
        """Per variant, which limit failed and by how much (empty when a variant was chosen)."""
        if self.chosen is not None:
            return ""
        if not self.verdicts:
            return "no finished variant"
        return "; ".join(f"{v.recipe}: {v.why_not()}" for v in self.verdicts)


def _accuracy(values: dict[str, float], metric: str) -> dict[str, float]:
    """task -> the budget's accuracy metric (acc for a task that has no acc_norm)."""
    tasks = {key.split(".", 1)[1] for key in values}
    out = {}
    for task in sorted(tasks):
        value = values.get(f"{metric}.{task}", values.get(f"acc.{task}"))
        if value is not None:
            out[task] = value
    return out


def _check(limit: str, subject: str, measured: float, allowed: float, at_most: bool) -> Check:
    """One limit applied: `measured` at most (or at least) `allowed`, equality passing."""
    slack = LIMIT_SLACK * max(1.0, abs(allowed))
    passed = measured <= allowed + slack if at_most else measured >= allowed - slack
    return Check(limit=limit, subject=subject, measured=measured, allowed=allowed, passed=passed)


def budget_checks(variant: Variant, dense: Variant, budget: Budget) -> tuple[list[Check], str | None]:
    """Every limit of the budget applied to a variant against its dense model; (checks, problem)."""
    checks: list[Check] = []
    if budget.max_ppl_increase is not None:
        dataset = budget.dataset or next(iter(sorted(dense.perplexity)), None)
        if dataset is None or dataset not in dense.perplexity or dataset not in variant.perplexity:
            return [], f"no perplexity on {dataset or 'any dataset'} to apply max_ppl_increase"
        increase = variant.perplexity[dataset] / dense.perplexity[dataset] - 1.0
        checks.append(_check("max_ppl_increase", dataset, increase, budget.max_ppl_increase, at_most=True))
    if budget.needs_tasks:
        dense_acc = _accuracy(dense.accuracy, budget.accuracy_metric)
        acc = _accuracy(variant.accuracy, budget.accuracy_metric)
        missing = sorted(set(dense_acc) - set(acc))
        if not dense_acc or missing:
            return checks, f"no {budget.accuracy_metric} for {', '.join(missing) or 'any task'}"
        if budget.min_accuracy_retained is not None:
            retained = sum(acc[t] for t in dense_acc) / max(sum(dense_acc.values()), 1e-12)
            subject = f"mean {budget.accuracy_metric}"
            checks.append(_check("min_accuracy_retained", subject, retained, budget.min_accuracy_retained, False))
        if budget.max_task_drop is not None:
            for task, dense_value in dense_acc.items():
                drop = dense_value - acc[task]
                checks.append(_check("max_task_drop", task, drop, budget.max_task_drop, at_most=True))
    return checks, None


def _cost(variant: Variant, objective: Objective) -> float | None:
    """What a size or latency objective minimizes: MiB on disk, or decode ms per token at batch 1."""
    return variant.size_mib if objective == "size_mib" else variant.speed.get(LATENCY_METRIC)


def objective_value(variant: Variant, objective: Objective) -> float | None:
    """Larger is better: sparsity, or minus size / latency."""
    if objective == "sparsity":
        return variant.sparsity
    cost = _cost(variant, objective)
    return None if cost is None else -cost


def gain_over_dense(variant: Variant, dense: Variant, objective: Objective) -> tuple[float | None, str | None]:
    """For a size or latency objective: (x dense, why that is no gain). Zeros in dense tensors make a
    variant neither smaller nor faster, so a variant must beat dense by more than a tie to ship on these."""
    if objective == "sparsity":
        return None, None
    value, base = _cost(variant, objective), _cost(dense, objective)
    if value is None or value <= 0:  # not measured: the objective's own problem says so
        return None, None
    if base is None or base <= 0:
        return None, f"dense {objective} not measured"
    gain, tie = base / value, TIE[objective]
    if objective == "latency" and _dense_shaped(variant, dense):
        # Same tensors, same dtype: the same kernels run, so a measured difference is timing noise.
        return gain, f"no faster than dense: dense's shapes and dtype (measured {gain:.2f}x is timing noise)"
    if base - value > tie * base:
        return gain, None
    word = "smaller" if objective == "size_mib" else "faster"
    return gain, f"no {word} than dense ({gain:.2f}x; within {tie:.0%} is a tie)"


def _dense_shaped(variant: Variant, dense: Variant) -> bool:
    """Zeros kept in dense tensors: as many parameters as dense, in the same dtype."""
    known = None not in (variant.parameters, dense.parameters)
    return known and variant.parameters == dense.parameters and variant.dtype == dense.dtype


def judge(variant: Variant, dense: Variant, spec: SelectionSpec) -> Verdict:
    if variant.status != "FINISHED":
        return Verdict(recipe=variant.recipe, run_id=variant.run_id, problem=f"run {variant.status.lower()}")
    checks, problem = budget_checks(variant, dense, spec)
    value = objective_value(variant, spec.objective)
    if problem is None and value is None:
        problem = f"no {spec.objective} measured (objective)"
    gain, no_gain = gain_over_dense(variant, dense, spec.objective)
    return Verdict(
        recipe=variant.recipe,
        run_id=variant.run_id,
        checks=checks,
        problem=problem,
        objective_value=value,
        gain=gain,
        no_gain=no_gain,
    )


def _quality(verdict: Verdict) -> tuple[float, ...]:
    """Smaller is better: the perplexity increase, then minus the accuracy retained, then the worst task drop."""
    by_limit = {check.limit: check.measured for check in verdict.checks}
    drops = [check.measured for check in verdict.checks if check.limit == "max_task_drop"]
    return (
        by_limit.get("max_ppl_increase", 0.0),
        -by_limit.get("min_accuracy_retained", 0.0),
        max(drops, default=0.0),
    )


def _tied(value: float, best: float, objective: Objective) -> bool:
    tolerance = TIE[objective]
    if objective == "sparsity":
        return best - value <= tolerance
    return best - value <= tolerance * abs(best)


def choose(model: str, dense: Variant, variants: list[Variant], spec: SelectionSpec) -> ModelChoice:
    """The variant within budget with the best objective; among those tied on it, the best quality."""
    verdicts = [judge(variant, dense, spec) for variant in variants]
    eligible = [v for v in verdicts if v.eligible]
    if not eligible:
        return ModelChoice(model=model, chosen=None, verdicts=verdicts)
    best = max(v.objective_value for v in eligible if v.objective_value is not None)
    tied = [v for v in eligible if v.objective_value is not None and _tied(v.objective_value, best, spec.objective)]
    winner = min(tied, key=_quality)
    return ModelChoice(model=model, chosen=winner.recipe, run_id=winner.run_id, verdicts=verdicts)


def describe_choice(choice: ModelChoice) -> str:
    name = Path(choice.model).name
    if choice.chosen is None:
        return f"{name}: nothing within budget -- {choice.why_none()}"
    verdict = next(v for v in choice.verdicts if v.recipe == choice.chosen)
    measured = ", ".join(
        f"{c.limit} {c.subject} {c.measured:.4f}" for c in verdict.checks if not math.isnan(c.measured)
    )
    if verdict.gain is not None:
        measured += f"{', ' if measured else ''}{verdict.gain:.2f}x dense"
    return f"{name}: {choice.chosen}" + (f" ({measured})" if measured else "")


# --- sparsity searches (bisection over ordinary pairs, run by flows.search) ---


class Probe(BaseModel):
    sparsity: float
    recipe_name: str
    within_budget: bool
    checks: list[Check] = []
    why_not: str = ""


class SearchOutcome(BaseModel):
    model: str
    recipe_name: str
    low: float
    high: float
    probes: list[Probe] = []
    best: float | None = None  # the highest probed sparsity within budget
    error: str | None = None  # a probe that failed to run stops its search

    def describe(self) -> str:
        name = f"{Path(self.model).name} x {self.recipe_name}"
        probed = ", ".join(f"{p.sparsity:g} {'ok' if p.within_budget else 'over'}" for p in self.probes)
        if self.error:
            return f"{name}: search stopped, {self.error} (probes: {probed})"
        found = f"highest sparsity within budget {self.best:g}" if self.best is not None else "no probe within budget"
        return f"{name}: {found} (probes: {probed})"
