"""A batch's sparsity searches: per model and search recipe, bisection for the highest sparsity within the
batch's budget. Every probe is an ordinary pair (recipe at that sparsity, named `<recipe>@<sparsity>`), so
it is cached, resumed and published like any other; a rerun of the search computes nothing new."""

from __future__ import annotations

from collections.abc import Callable

from flows.batch_config import BatchRecipe
from flows.pairs import PairRequest, PairResult
from tasks.selection import Probe, SearchOutcome, Verdict

PROBE_SEPARATOR = "@"
PROBE_DIGITS = 4  # probed sparsities are rounded: the same search always probes the same recipes


def probe_name(recipe_name: str, sparsity: float) -> str:
    return f"{recipe_name}{PROBE_SEPARATOR}{sparsity:.{PROBE_DIGITS}f}".rstrip("0").rstrip(".")


def search_of(recipe_name: str) -> str:
    """The batch recipe a pair belongs to (a probe's search recipe, else the name itself)."""
    return recipe_name.split(PROBE_SEPARATOR, 1)[0]


class _Bisection:
    """One model's search: the next sparsity to probe, and what the probes said."""

    def __init__(self, model: str, entry: BatchRecipe, make_request: Callable[[BatchRecipe, float], PairRequest]):
        assert entry.search is not None
        self.entry, self.make_request = entry, make_request
        self.low, self.high, self.steps_left = entry.search.low, entry.search.high, entry.search.steps
        self.outcome = SearchOutcome(model=model, recipe_name=entry.name, low=self.low, high=self.high)

    def next_request(self) -> PairRequest | None:
        if self.steps_left == 0 or self.outcome.error is not None:
            return None
        sparsity = round((self.low + self.high) / 2, PROBE_DIGITS)
        return self.make_request(self.entry, sparsity)

    def record(self, request: PairRequest, result: PairResult, verdict: Verdict | None) -> None:
        self.steps_left -= 1
        sparsity = float(request.recipe.sparsity or 0.0)
        if result.status != "completed" or verdict is None:
            self.outcome.error = f"probe {request.recipe_name} failed: {result.error}"
            return
        within = verdict.within_budget
        self.outcome.probes.append(
            Probe(
                sparsity=sparsity,
                recipe_name=request.recipe_name,
                within_budget=within,
                checks=verdict.checks,
                why_not="" if within else verdict.why_not(),
            )
        )
        if within:
            self.low = sparsity
            self.outcome.best = max(sparsity, self.outcome.best or 0.0)
        else:
            self.high = sparsity


def run_searches(
    searches: list[tuple[str, BatchRecipe]],
    make_request: Callable[[str, BatchRecipe, float], PairRequest],
    run_pairs: Callable[[list[PairRequest]], list[PairResult]],
    judge: Callable[[PairResult], Verdict],
) -> tuple[list[PairResult], list[SearchOutcome]]:
    """Bisect every search; each round probes one sparsity per search at once (in parallel on a pool)."""
    bisections = [_Bisection(model, entry, lambda e, s, m=model: make_request(m, e, s)) for model, entry in searches]
    results: list[PairResult] = []
    while True:
        round_ = [(b, request) for b in bisections if (request := b.next_request()) is not None]
        if not round_:
            break
        outcomes = run_pairs([request for _, request in round_])
        for (bisection, request), result in zip(round_, outcomes, strict=True):
            results.append(result)
            verdict = judge(result) if result.status == "completed" else None
            bisection.record(request, result, verdict)
    return results, [b.outcome for b in bisections]
