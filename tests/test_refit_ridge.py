"""APT's refit regularised toward its removal updates, the ridge chosen per layer on held-out calibration tokens."""

from __future__ import annotations

import pytest
import torch

from pruning_core.masks import SparsityTarget
from pruning_core.methods import METHODS, LayerProblem
from pruning_core.methods.apt import AptSettings, conjugate_gradient_refit, exact_refit, select_mask
from pruning_core.methods.refine import MaskRefinement, admm_mask, layer_loss
from pruning_core.stats import InputStatistics, StatisticsPlan, damped
from tests.conftest import correlated_layer

TARGETS = [SparsityTarget(ratio=0.5), SparsityTarget.parse_pattern("2:4"), SparsityTarget(ratio=0.7)]


def split_statistics(inputs: torch.Tensor, heldout_fraction: float = 0.25, batch: int = 64) -> InputStatistics:
    stats = StatisticsPlan(heldout_fraction=heldout_fraction).start(inputs.shape[1], "cpu")
    for part in inputs.split(batch):
        stats.add_batch(part)
    return stats


def heldout_loss(weight: torch.Tensor, pruned: torch.Tensor, inputs: torch.Tensor) -> float:
    return float(((weight - pruned) @ inputs.T).pow(2).sum())


def test_the_split_sums_to_the_whole_and_fit_and_heldout_are_their_own_means():
    _, inputs = correlated_layer(cols=24, tokens=500)
    stats = split_statistics(inputs, batch=100)  # 5 batches: the last 25 tokens of each are held out
    assert stats.heldout_tokens == 125 and stats.has_heldout()
    held = torch.cat([part[-25:] for part in inputs.split(100)])
    fit = torch.cat([part[:-25] for part in inputs.split(100)])
    torch.testing.assert_close(stats.heldout_hessian(), 2 * held.T @ held / 125, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.fit_hessian(), 2 * fit.T @ fit / 375, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.hessian(), 2 * inputs.T @ inputs / 500, rtol=1e-4, atol=1e-4)
    assert not split_statistics(inputs, heldout_fraction=0.0).has_heldout()


def test_a_ridge_refit_is_the_least_squares_of_the_pulled_problem_and_a_huge_one_keeps_the_anchor():
    weight, inputs = correlated_layer(rows=12, cols=40, tokens=400)
    stats = split_statistics(inputs)
    problem = LayerProblem("layer", weight, stats, SparsityTarget(ratio=0.5))
    inverse, damping = stats.inverse(problem.damping)
    updated, mask = select_mask(weight, inverse, problem, 16)
    system = damped(stats.hessian(), damping)
    ridge = 0.3 * float(system.diagonal().mean())
    refit = conjugate_gradient_refit(weight, system, mask, start=updated, anchor=updated, ridge=ridge)
    assert torch.equal(refit.weight == 0, mask)
    # The same minimiser in closed form, row by row: (H + rho I)_KK x_K = (H w + rho u)_K.
    pulled = system + ridge * torch.eye(system.shape[0])
    target = weight @ system + ridge * updated
    for row in range(weight.shape[0]):
        kept = ~mask[row]
        expected = torch.linalg.solve(pulled[kept][:, kept].double(), target[row, kept].double())
        torch.testing.assert_close(refit.weight[row, kept].double(), expected, rtol=1e-3, atol=1e-4)
    held = conjugate_gradient_refit(weight, system, mask, start=updated, anchor=updated, ridge=1e6 * ridge)
    torch.testing.assert_close(held.weight, updated, rtol=0, atol=1e-3)
    unpulled = conjugate_gradient_refit(weight, system, mask, start=updated)
    assert torch.equal(unpulled.weight, conjugate_gradient_refit(weight, system, mask, start=updated, ridge=0.0).weight)
    assert float((unpulled.weight - exact_refit(weight, system, mask)).norm()) < 1e-2 * float(weight.norm())


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.describe())
@pytest.mark.parametrize("seed", [0, 1])
def test_on_a_layer_wide_for_its_calibration_the_ridge_is_never_worse_held_out_than_sparsegpt(target, seed):
    """256 inputs, 384 calibration tokens: the plain refit fits the sample; the regularised one must not lose to
    SparseGPT on 4096 unseen tokens of the same distribution, nor be more than 2% worse than the plain refit."""
    weight, inputs = correlated_layer(rows=64, cols=256, tokens=384 + 4096, seed=seed)
    calibration, unseen = inputs[:384], inputs[384:]
    stats = split_statistics(calibration)
    pruned = {
        name: METHODS[method].prune(
            LayerProblem(
                "layer", weight, stats, target, 64, 0.01, settings=AptSettings(refit_ridge=ridge, mask_refinement=None)
            )
        )
        for name, method, ridge in (
            ("sparsegpt", "sparsegpt", "none"),
            ("apt", "apt", "none"),
            ("apt_ridge", "apt", "heldout"),
        )
    }
    losses = {name: heldout_loss(weight, result, unseen) for name, result in pruned.items()}
    assert losses["apt_ridge"] <= losses["sparsegpt"], losses
    assert losses["apt_ridge"] <= losses["apt"] * 1.02, losses
    zeros = pruned["apt_ridge"] == 0
    assert torch.equal(zeros, pruned["apt"] == 0), "the ridge moves kept weights only: the mask is APT's"


def test_with_ample_calibration_the_ridge_keeps_the_plain_refit_gain():
    weight, inputs = correlated_layer(rows=32, cols=64, tokens=8192 + 4096, seed=2)
    calibration, unseen = inputs[:8192], inputs[8192:]
    stats = split_statistics(calibration, batch=512)
    target = SparsityTarget(ratio=0.5)
    plain = METHODS["apt"].prune(LayerProblem("layer", weight, stats, target))
    ridge = METHODS["apt"].prune(
        LayerProblem("layer", weight, stats, target, settings=AptSettings(refit_ridge="heldout", mask_refinement=None))
    )
    sparsegpt = METHODS["sparsegpt"].prune(LayerProblem("layer", weight, stats, target))
    assert heldout_loss(weight, ridge, unseen) <= heldout_loss(weight, plain, unseen) * 1.02
    assert heldout_loss(weight, ridge, unseen) < heldout_loss(weight, sparsegpt, unseen)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.describe())
def test_mask_refinement_keeps_the_exact_sparsity_and_pattern_and_never_raises_the_loss(target):
    weight, inputs = correlated_layer(rows=48, cols=128, tokens=2048, seed=3)
    stats = split_statistics(inputs, heldout_fraction=0.0, batch=256)
    first = LayerProblem("layer", weight, stats, target, 64)
    refined_problem = LayerProblem(
        "layer", weight, stats, target, 64, settings=AptSettings(mask_refinement=MaskRefinement(iterations=30))
    )
    plain, refined = METHODS["apt"].prune(first), METHODS["apt"].prune(refined_problem)
    system = damped(stats.hessian(), 0.01)
    assert layer_loss(weight, refined, system) <= layer_loss(weight, plain, system)
    zeros = refined == 0
    if target.is_nm:
        assert torch.equal(zeros.reshape(48, -1, target.m).sum(dim=2), torch.full((48, 128 // target.m), target.n))
    else:
        assert int(zeros.sum()) == int((plain == 0).sum()) == round(target.ratio * weight.numel())


def test_admm_moves_a_poor_first_mask_to_a_better_one_with_as_many_zeros():
    """From a magnitude mask (blind to H), ADMM finds a support whose refit has a clearly lower loss."""
    weight, inputs = correlated_layer(rows=32, cols=96, tokens=2048, seed=4)
    stats = split_statistics(inputs, heldout_fraction=0.0, batch=256)
    system = damped(stats.hessian(), 0.01)
    target = SparsityTarget(ratio=0.7)
    magnitude = METHODS["magnitude"].prune(LayerProblem("layer", weight, stats, target)) == 0
    first = conjugate_gradient_refit(weight, system, magnitude, start=weight.masked_fill(magnitude, 0)).weight
    mask, start = admm_mask(weight, stats.eigen(0.01), first, magnitude, target, MaskRefinement(iterations=60))
    second = conjugate_gradient_refit(weight, system, mask, start=start).weight
    assert int(mask.sum()) == int(magnitude.sum()) and not torch.equal(mask, magnitude)
    assert layer_loss(weight, second, system) < 0.9 * layer_loss(weight, first, system)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.describe())
def test_a_loose_refit_bounds_its_distance_to_the_exact_one_from_above(target):
    """loss(loose) - gap_bound <= loss(exact) <= loss(loose): what lets refinement skip the first mask's exact
    refit wherever the refined one is already below the bound."""
    weight, inputs = correlated_layer(rows=48, cols=128, tokens=2048, seed=5)
    stats = split_statistics(inputs, heldout_fraction=0.0, batch=256)
    problem = LayerProblem("layer", weight, stats, target, 64)
    inverse, damping = stats.inverse(problem.damping)
    updated, mask = select_mask(weight, inverse, problem, 64)
    system = damped(stats.hessian(), damping)
    exact = layer_loss(weight, exact_refit(weight, system, mask), system)
    for tolerance in (1e-1, 1e-2, 1e-3):
        loose = conjugate_gradient_refit(
            weight, system, mask, start=updated, preconditioner=inverse, tolerance=tolerance, max_iterations=200
        )
        loss = layer_loss(weight, loose.weight, system)
        assert loss - loose.gap_bound <= exact * (1 + 1e-4) and exact <= loss * (1 + 1e-4)
        assert 0 <= loose.gap_bound < float("inf")
        if tolerance == 1e-3:
            assert loss - loose.gap_bound > 0.99 * exact  # tight enough to decide with
    from_updates = layer_loss(weight, updated, system)
    assert conjugate_gradient_refit(weight, system, mask, start=updated, max_iterations=0).gap_bound == float("inf")
    assert from_updates > exact  # the removal updates alone are not the refit
