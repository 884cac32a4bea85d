"""The quality budget at its boundaries, and which variant it chooses per objective."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasks.selection import LATENCY_METRIC, SelectionSpec, Variant, choose, describe_choice

DENSE = Variant(
    recipe="dense",
    perplexity={"wiki": 10.0, "c4": 20.0},
    accuracy={"acc.piqa": 0.60, "acc.arc_easy": 0.40, "acc_norm.piqa": 0.62},
    size_mib=100.0,
    speed={LATENCY_METRIC: 10.0},
)


def variant(recipe: str, ppl: float = 10.0, piqa: float = 0.60, arc: float = 0.40, **fields) -> Variant:
    fields.setdefault("sparsity", 0.5)
    return Variant(
        recipe=recipe,
        perplexity={"wiki": ppl, "c4": 2 * ppl},
        accuracy={"acc.piqa": piqa, "acc.arc_easy": arc},
        run_id=f"run-{recipe}",
        **fields,
    )


def one(candidate: Variant, **budget) -> tuple[bool, str]:
    choice = choose("m", DENSE, [candidate], SelectionSpec(**budget))
    return choice.chosen == candidate.recipe, choice.why_none()


def test_ppl_increase_at_the_limit_passes_and_just_over_fails():
    assert one(variant("at", ppl=11.0), max_ppl_increase=0.10) == (True, "")
    within, why = one(variant("over", ppl=11.001), max_ppl_increase=0.10)
    assert not within
    assert why == "over: max_ppl_increase c4: 0.1001 > 0.1 (over by 0.0001)"


def test_ppl_budget_uses_the_named_dataset_else_the_first_in_order():
    candidate = variant("v", ppl=10.5)
    candidate.perplexity["c4"] = 30.0  # +50% on c4, +5% on wiki
    assert not one(candidate, max_ppl_increase=0.10)[0]  # c4 sorts first
    assert one(candidate, max_ppl_increase=0.10, dataset="wiki")[0]
    assert "no perplexity on other" in one(candidate, max_ppl_increase=0.10, dataset="other")[1]


def test_accuracy_retained_at_the_limit_passes_and_just_under_fails():
    # dense mean 0.5; 0.97 of it is 0.485 = (0.58 + 0.39) / 2
    assert one(variant("at", piqa=0.58, arc=0.39), min_accuracy_retained=0.97)[0]
    within, why = one(variant("under", piqa=0.58, arc=0.3899), min_accuracy_retained=0.97)
    assert not within
    assert why.startswith("under: min_accuracy_retained mean acc: 0.9699 < 0.97 (short by 0.0001)")


def test_task_drop_at_the_limit_passes_and_just_over_fails():
    assert one(variant("at", piqa=0.57, arc=0.37), max_task_drop=0.03)[0]  # 0.6 - 0.57 is 0.030000000000000027
    within, why = one(variant("over", piqa=0.57, arc=0.3699), max_task_drop=0.03)
    assert not within
    assert why == "over: max_task_drop arc_easy: 0.0301 > 0.03 (over by 0.0001)"


def test_accuracy_metric_acc_norm_falls_back_to_acc_for_tasks_without_it():
    candidate = variant("v", piqa=0.2, arc=0.40)
    candidate.accuracy["acc_norm.piqa"] = 0.61  # acc_norm dropped 0.01, acc dropped 0.4
    assert one(candidate, max_task_drop=0.03, accuracy_metric="acc_norm")[0]
    assert not one(candidate, max_task_drop=0.03)[0]


def test_every_limit_must_hold():
    candidate = variant("v", ppl=10.5, piqa=0.50)
    within, why = one(candidate, max_ppl_increase=0.10, min_accuracy_retained=0.95, max_task_drop=0.05)
    assert not within
    assert "min_accuracy_retained" in why and "max_task_drop piqa: 0.1000 > 0.05" in why
    assert "max_ppl_increase" not in why


def test_sparsity_objective_takes_the_sparsest_within_budget_ties_by_quality():
    variants = [
        variant("s50", ppl=10.4, sparsity=0.5),
        variant("nm24", ppl=10.2, sparsity=0.5002),  # tied on sparsity, better quality
        variant("s60", ppl=10.9, sparsity=0.6),
        variant("s70", ppl=14.0, sparsity=0.7),  # over budget
    ]
    choice = choose("m", DENSE, variants, SelectionSpec(max_ppl_increase=0.10))
    assert choice.chosen == "s60" and choice.run_id == "run-s60"
    choice = choose("m", DENSE, variants[:2], SelectionSpec(max_ppl_increase=0.10))
    assert choice.chosen == "nm24"


def test_size_and_latency_objectives_take_the_smallest():
    variants = [
        variant("unstructured", ppl=10.1, sparsity=0.7, size_mib=100.0, speed={LATENCY_METRIC: 10.0}),
        variant("structured", ppl=10.8, sparsity=0.2, size_mib=80.0, speed={LATENCY_METRIC: 8.0}),
        variant("structured-big", ppl=10.5, sparsity=0.1, size_mib=90.0, speed={LATENCY_METRIC: 7.9}),
    ]
    by_size = choose("m", DENSE, variants, SelectionSpec(max_ppl_increase=0.10, objective="size_mib"))
    assert by_size.chosen == "structured"
    # 7.9 and 8.0 ms are tied (within 5%): the better perplexity wins
    by_latency = choose("m", DENSE, variants, SelectionSpec(max_ppl_increase=0.10, objective="latency"))
    assert by_latency.chosen == "structured-big"
    no_speed = [variant("v", ppl=10.0)]
    choice = choose("m", DENSE, no_speed, SelectionSpec(max_ppl_increase=0.10, objective="latency"))
    assert choice.chosen is None and "no latency measured" in choice.why_none()


def test_nothing_within_budget_says_why_per_variant():
    variants = [
        variant("s50", ppl=12.0),
        Variant(recipe="broken", status="FAILED"),
        variant("s70", ppl=30.0, piqa=0.5),
    ]
    choice = choose("m", DENSE, variants, SelectionSpec(max_ppl_increase=0.10, max_task_drop=0.05))
    assert choice.chosen is None and choice.run_id is None
    assert choice.why_none() == (
        "s50: max_ppl_increase c4: 0.2000 > 0.1 (over by 0.1000); broken: run failed; "
        "s70: max_ppl_increase c4: 2.0000 > 0.1 (over by 1.9000); max_task_drop piqa: 0.1000 > 0.05 (over by 0.0500)"
    )
    assert choose("m", DENSE, [], SelectionSpec(max_ppl_increase=0.1)).why_none() == "no finished variant"


def test_missing_accuracy_is_a_stated_problem_not_a_pass():
    candidate = Variant(recipe="v", sparsity=0.5, perplexity={"wiki": 10.0}, accuracy={"acc.piqa": 0.6})
    choice = choose("m", DENSE, [candidate], SelectionSpec(min_accuracy_retained=0.9))
    assert choice.chosen is None and choice.why_none() == "v: no acc for arc_easy"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "a budget needs max_ppl_increase, min_accuracy_retained or max_task_drop"),
        ({"dataset": "wiki", "max_task_drop": 0.1}, "'dataset' names where max_ppl_increase is measured"),
        ({"max_ppl_increase": -0.1}, "greater than or equal to 0"),
        ({"max_ppl_increase": 0.1, "objective": "speed"}, "'sparsity', 'size_mib' or 'latency'"),
        ({"max_ppl_increase": 0.1, "threshold": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_selection_is_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        SelectionSpec(**fields)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"selection": {"max_ppl_increase": 0.1, "dataset": "c4"}}, "selection.dataset 'c4' is not one of"),
        ({"selection": {"max_task_drop": 0.03}}, "min_accuracy_retained / max_task_drop need evaluation.tasks"),
        ({"selection": {"max_ppl_increase": 0.1, "objective": "latency"}}, "latency needs evaluation.speed"),
        ({"recipes": [{"name": "s", "method": "wanda", "search": {"low": 0.4, "high": 0.8}}]}, "need the batch's"),
        (
            {"recipes": [{"name": "s", "method": "wanda", "sparsity": 0.5, "search": {"low": 0.4, "high": 0.8}}]},
            "give search, not sparsity/pattern/ratio",
        ),
        ({"recipes": [{"name": "s", "method": "llm_pruner", "search": {"low": 0.1, "high": 0.3}}]}, "is structured"),
        ({"recipes": [{"name": "s", "method": "wanda", "search": {"low": 0.8, "high": 0.4}}]}, "must be below"),
        (
            {"recipes": [{"name": "s", "method": "wanda", "allocation": "owl", "search": {"low": 0.4, "high": 0.9}}]},
            "sparsity must lie in",
        ),
    ],
)
def test_batch_selection_and_search_are_checked_before_any_work(tiny_model_dir, change, message):
    from flows.batch_config import BatchConfig
    from tests.conftest import batch_mapping

    mapping = batch_mapping([str(tiny_model_dir)], [{"name": "w", "method": "wanda", "sparsity": 0.5}])
    if "recipes" in change and "selection" not in change:
        mapping["selection"] = {"max_ppl_increase": 0.1} if "need the batch's" not in message else None
    mapping.update(change)
    with pytest.raises(ValidationError, match=message):
        BatchConfig.model_validate(mapping)


def test_search_recipe_probes_are_plain_recipes(tiny_model_dir):
    from flows.batch_config import BatchConfig
    from flows.search import probe_name, search_of
    from tests.conftest import batch_mapping

    search = {"name": "ws", "method": "wanda", "allocation": "owl", "search": {"low": 0.4, "high": 0.8, "steps": 3}}
    mapping = batch_mapping([str(tiny_model_dir)], [search]) | {"selection": {"max_ppl_increase": 0.1}}
    batch = BatchConfig.model_validate(mapping)
    assert batch.pairs() == [] and [entry.name for _, entry in batch.searches()] == ["ws"]
    (_, entry), calibration = batch.searches()[0], batch.calibration
    recipe = entry.recipe(calibration, 0.65)
    assert (recipe.sparsity, recipe.allocation, recipe.calibration_samples) == (0.65, "owl", calibration.samples)
    # the same recipe a plain entry at 0.65 makes: probes share fingerprints (and caches) with ordinary pairs
    plain = BatchConfig.model_validate(
        mapping | {"recipes": [{"name": "p", "method": "wanda", "allocation": "owl", "sparsity": 0.65}]}
    )
    assert plain.recipes[0].recipe(calibration).fingerprint() == recipe.fingerprint()
    assert probe_name("ws", 0.65) == "ws@0.65" and probe_name("ws", 0.6) == "ws@0.6"
    assert search_of("ws@0.65") == "ws" and search_of("w") == "w"


def _costing(recipe: str, objective: str, cost: float, ppl: float) -> Variant:
    """A variant of the given size (MiB) or latency (ms per token); dense: 100 MiB, 10 ms."""
    return variant(
        recipe, ppl=ppl, **({"size_mib": cost} if objective == "size_mib" else {"speed": {LATENCY_METRIC: cost}})
    )


@pytest.mark.parametrize(
    ("objective", "at_dense", "within_tie", "better", "refusal"),
    [
        ("latency", 10.0, 9.6, 8.0, "no faster than dense ({}; within 5% is a tie)"),
        ("size_mib", 100.0, 99.2, 80.0, "no smaller than dense ({}; within 1% is a tie)"),
    ],
)
def test_size_and_latency_objectives_refuse_a_variant_no_better_than_dense(
    objective, at_dense, within_tie, better, refusal
):
    spec = SelectionSpec(max_ppl_increase=0.10, objective=objective)
    candidates = [
        _costing("unstructured", objective, at_dense, ppl=10.1),  # zeros: dense's shapes, dense's kernels
        _costing("barely", objective, within_tie, ppl=10.1),
        _costing("structured", objective, better, ppl=10.8),  # worse quality, really better on the objective
    ]
    choice = choose("m", DENSE, candidates, spec)
    assert choice.chosen == "structured"
    verdicts = {v.recipe: v for v in choice.verdicts}
    assert verdicts["unstructured"].within_budget and not verdicts["unstructured"].eligible
    assert verdicts["unstructured"].why_not() == refusal.format("1.00x")
    assert verdicts["barely"].why_not() == refusal.format(f"{at_dense / within_tie:.2f}x")
    assert verdicts["structured"].gain == pytest.approx(1.25)
    assert describe_choice(choice) == "m: structured (max_ppl_increase c4 0.0800, 1.25x dense)"
    alone = choose("m", DENSE, candidates[:2], spec)
    assert alone.chosen is None
    assert alone.why_none() == f"unstructured: {refusal.format('1.00x')}; barely: {verdicts['barely'].why_not()}"


def test_latency_never_ships_zeros_in_dense_shapes_on_a_lucky_timing():
    dense = DENSE.model_copy(update={"parameters": 1000.0, "dtype": "float32"})
    lucky = variant("w50", speed={LATENCY_METRIC: 6.8}, parameters=1000.0, dtype="float32")  # noise: 1.47x
    shallower = variant("depth", ppl=10.9, speed={LATENCY_METRIC: 6.9}, parameters=400.0, dtype="float32")
    halved = variant("bf16", speed={LATENCY_METRIC: 6.0}, parameters=1000.0, dtype="bfloat16")
    spec = SelectionSpec(max_ppl_increase=0.10, objective="latency")
    choice = choose("m", dense, [lucky, shallower], spec)
    assert choice.chosen == "depth"
    refused = {v.recipe: v for v in choice.verdicts}["w50"]
    assert refused.within_budget and refused.why_not() == (
        "no faster than dense: dense's shapes and dtype (measured 1.47x is timing noise)"
    )
    assert choose("m", dense, [lucky, shallower, halved], spec).chosen == "bf16"  # another dtype can be faster
    # Without parameter counts (older runs) the timing alone decides.
    assert choose("m", DENSE, [variant("w50", speed={LATENCY_METRIC: 6.8})], spec).chosen == "w50"


def test_a_gain_needs_dense_measured_and_a_budget_failure_says_both():
    no_dense_speed = DENSE.model_copy(update={"speed": {}})
    faster = variant("v", speed={LATENCY_METRIC: 5.0})
    choice = choose("m", no_dense_speed, [faster], SelectionSpec(max_ppl_increase=0.10, objective="latency"))
    assert choice.chosen is None and choice.why_none() == "v: dense latency not measured"
    over = variant("over", ppl=12.0, size_mib=100.0)
    choice = choose("m", DENSE, [over], SelectionSpec(max_ppl_increase=0.10, objective="size_mib"))
    assert choice.why_none() == (
        "over: max_ppl_increase c4: 0.2000 > 0.1 (over by 0.1000); no smaller than dense (1.00x; within 1% is a tie)"
    )


def test_sparsity_objective_takes_a_variant_at_dense_size_and_speed():
    zeros = variant("w50", size_mib=100.0, speed={LATENCY_METRIC: 10.0})
    choice = choose("m", DENSE, [zeros], SelectionSpec(max_ppl_increase=0.10))
    assert choice.chosen == "w50" and choice.verdicts[0].gain is None
