"""Each method on one layer: exact sparsity, N:M groups, error ordering, APT = least squares."""

from __future__ import annotations

import pytest
import torch

from pruning_core.masks import SparsityTarget, lowest_n_of_m, quota
from pruning_core.methods import METHODS, LayerProblem
from pruning_core.methods.apt import (
    CG_MAX_ITERATIONS,
    CG_TOLERANCE,
    AptSettings,
    conjugate_gradient_refit,
    exact_refit,
    removal_coefficients,
)
from pruning_core.stats import InputStatistics, damped, damped_inverse
from tests.conftest import correlated_layer

TARGETS = [
    SparsityTarget(ratio=0.5),
    SparsityTarget(ratio=0.7),
    SparsityTarget.parse_pattern("2:4"),
    SparsityTarget.parse_pattern("4:8"),
]
BLOCK = 48


def statistics(inputs: torch.Tensor) -> InputStatistics:
    stats = InputStatistics(inputs.shape[1], "cpu", with_hessian=True)
    for batch in inputs.split(300):  # streaming over uneven batches
        stats.add_batch(batch)
    return stats


def prune(method: str, weight, inputs, target, block=BLOCK) -> torch.Tensor:
    return METHODS[method].prune(LayerProblem("layer", weight, statistics(inputs), target, block, 0.01))


def expected_zeros(method: str, target: SparsityTarget, rows: int, cols: int) -> torch.Tensor:
    """Zeros each row must hold (per-row methods) or the matrix must hold (per-matrix/per-block)."""
    if target.is_nm:
        return torch.full((rows,), cols // target.m * target.n)
    if method == "wanda":
        return torch.full((rows,), sum(quota(target.ratio, s, min(s + BLOCK, cols)) for s in range(0, cols, BLOCK)))
    return torch.tensor(round(target.ratio * rows * cols))


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.describe())
@pytest.mark.parametrize("method", sorted(METHODS))
def test_exact_sparsity_and_groups(method, target):
    weight, inputs = correlated_layer(rows=40, cols=120)
    pruned = prune(method, weight, inputs, target)
    zeros = pruned == 0
    expected = expected_zeros(method, target, *weight.shape)
    if expected.ndim:
        assert torch.equal(zeros.sum(dim=1), expected)
    else:
        assert int(zeros.sum()) == int(expected)
    if target.is_nm:
        per_group = zeros.reshape(40, -1, target.m).sum(dim=2)
        assert torch.all(per_group == target.n), "every N:M group of every row has exactly N zeros"
    if method in ("magnitude", "wanda"):
        assert torch.equal(pruned[~zeros], weight[~zeros]), "score-only methods do not update kept weights"


def test_per_row_quota_gives_exact_ratio():
    assert sum(quota(0.7, s, min(s + 128, 576)) for s in range(0, 576, 128)) == round(0.7 * 576)


def reconstruction_error(weight, pruned, inputs) -> float:
    return float(((weight - pruned) @ inputs.T).pow(2).sum())


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.describe())
def test_error_ordering_on_correlated_inputs(target):
    weight, inputs = correlated_layer()
    errors = {m: reconstruction_error(weight, prune(m, weight, inputs, target), inputs) for m in METHODS}
    assert errors["apt"] <= errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def lstsq_reference(weight, inputs, hessian, mask, damping):
    """Row-wise least squares of the damped problem: [X sqrt(2/N); sqrt(λ m) I] w_K ≈ [...] w."""
    tokens, cols = inputs.shape
    lam = damping * torch.diagonal(hessian).mean().double()
    design = torch.cat([inputs.double() * (2.0 / tokens) ** 0.5, lam.sqrt() * torch.eye(cols, dtype=torch.float64)])
    reference = torch.zeros_like(weight, dtype=torch.float64)
    for row in range(weight.shape[0]):
        kept = ~mask[row]
        solution = torch.linalg.lstsq(design[:, kept], design @ weight[row].double()).solution
        reference[row, kept] = solution
    return reference


def layer_loss(weight, pruned, hessian) -> float:
    delta = (weight - pruned).double()
    return float(((delta @ hessian.double()) * delta).sum())


# The CG refit stops at a relative residual of CG_TOLERANCE: its weights are within a few times that of the
# exact least squares, and its layer loss within 1e-4 (relative) of the optimum.
CG_WEIGHT_TOLERANCE, CG_LOSS_TOLERANCE = 5e-3, 1e-4


@pytest.mark.parametrize("mask_kind", ["random", "2:4", "70%"])
def test_apt_refits_with_fixed_mask_equal_least_squares(mask_kind):
    weight, inputs = correlated_layer(rows=64, cols=96)
    stats = statistics(inputs)
    generator = torch.Generator().manual_seed(1)
    if mask_kind == "2:4":
        mask = lowest_n_of_m(torch.rand(weight.shape, generator=generator), 2, 4)
    else:
        mask = torch.rand(weight.shape, generator=generator) < (0.5 if mask_kind == "random" else 0.7)
    hessian = stats.hessian()
    system = damped(hessian, 0.01)
    reference = lstsq_reference(weight, inputs, hessian, mask, 0.01)
    exact = exact_refit(weight, system, mask)
    assert torch.all(exact[mask] == 0)
    assert float((exact.double() - reference).norm() / reference.norm()) < 1e-4
    refit = conjugate_gradient_refit(weight, system, mask, start=weight.masked_fill(mask, 0.0))
    assert refit.residual <= CG_TOLERANCE and refit.iterations < CG_MAX_ITERATIONS
    assert torch.equal(refit.weight == 0, mask), "removed weights stay zero and kept ones stay nonzero"
    assert float((refit.weight.double() - reference).norm() / reference.norm()) < CG_WEIGHT_TOLERANCE
    optimum = layer_loss(weight, reference, system)
    assert layer_loss(weight, refit.weight, system) <= optimum * (1 + CG_LOSS_TOLERANCE)


@pytest.mark.parametrize("refit", ["cg", "exact"])
def test_apt_final_weights_are_least_squares_of_its_own_mask(refit):
    weight, inputs = correlated_layer(rows=32, cols=64)
    target = SparsityTarget.parse_pattern("2:4")
    problem = LayerProblem(
        "layer", weight, statistics(inputs), target, BLOCK, 0.01, AptSettings(refit=refit, mask_refinement=None)
    )
    pruned = METHODS["apt"].prune(problem)
    hessian = statistics(inputs).hessian()
    reference = lstsq_reference(weight, inputs, hessian, pruned == 0, 0.01)
    difference = float((pruned.double() - reference).norm() / reference.norm())
    assert difference < (1e-4 if refit == "exact" else CG_WEIGHT_TOLERANCE)
    optimum = layer_loss(weight, reference, damped(hessian, 0.01))
    assert layer_loss(weight, pruned, damped(hessian, 0.01)) <= optimum * (1 + CG_LOSS_TOLERANCE)


def test_removal_coefficients_direct_and_through_the_complement_agree():
    """Rows removing more than half of a block solve the complement system; both equal the direct solve."""
    _, inputs = correlated_layer(rows=4, cols=32)
    inverse_block, _ = damped_inverse(statistics(inputs).hessian(), 0.01)
    generator = torch.Generator().manual_seed(3)
    w_block = torch.randn(24, 32, generator=generator)
    chosen = torch.rand(24, 32, generator=generator) < torch.linspace(0.05, 1.0, 24).unsqueeze(1)
    chosen[0] = False  # a row removing nothing
    coefficients = removal_coefficients(w_block, inverse_block, chosen)
    assert chosen.sum(1).max() > 16 > chosen.sum(1)[1:].min(), "both paths are exercised"
    for row in range(24):
        p = chosen[row].nonzero().squeeze(1)
        expected = torch.zeros(32, dtype=torch.float64)
        if len(p):
            system = inverse_block.double()[p][:, p]
            expected[p] = torch.linalg.solve(system, w_block[row, p].double())
        assert torch.allclose(coefficients[row].double(), expected, rtol=1e-3, atol=1e-3 * expected.abs().max()), row


def test_cg_refit_converges_with_a_rank_deficient_hessian():
    """Dead and duplicated inputs make X X^T singular; damping keeps the refit well posed."""
    weight, inputs = correlated_layer(rows=48, cols=64)
    inputs[:, 3] = 0  # a dead input
    inputs[:, 10:20] = inputs[:, 20:30]  # ten duplicated inputs
    inputs = inputs[:40]  # fewer tokens than inputs: rank <= 40
    stats = statistics(inputs)
    assert torch.linalg.matrix_rank(stats.hessian()) <= 40 < inputs.shape[1]
    pruned = prune("apt", weight, inputs, SparsityTarget(ratio=0.5), block=16)
    assert torch.isfinite(pruned).all() and torch.all(pruned[:, 3] == 0)
    hessian, damping = stats.hessian(), 0.01
    system = damped(hessian, damping)
    mask = pruned == 0
    refit = conjugate_gradient_refit(weight.masked_fill(mask, 0.0), system, mask, start=weight.masked_fill(mask, 0))
    exact = exact_refit(weight.masked_fill(mask, 0.0), system, mask)
    assert refit.residual <= CG_TOLERANCE and refit.iterations < CG_MAX_ITERATIONS
    assert layer_loss(weight, refit.weight, system) <= layer_loss(weight, exact, system) * (1 + CG_LOSS_TOLERANCE)


def test_dead_inputs_are_zeroed_and_do_not_break_the_hessian():
    weight, inputs = correlated_layer(rows=16, cols=32)
    inputs[:, 5] = 0
    for method in ("sparsegpt", "apt"):
        pruned = prune(method, weight, inputs, SparsityTarget(ratio=0.5), block=16)
        assert torch.isfinite(pruned).all()
        assert torch.all(pruned[:, 5] == 0)


def test_damping_is_raised_and_logged_when_cholesky_fails(caplog):
    indefinite = -torch.eye(8)
    indefinite[0, 0] = 50.0  # mean diag > 0 but far from positive definite
    with caplog.at_level("WARNING"):
        inverse, used = damped_inverse(indefinite, 0.01, "layer")
    assert used > 0.01
    assert "Cholesky failed" in caplog.text
    assert torch.isfinite(inverse).all()


def test_hessian_is_streamed_mean_of_outer_products():
    _, inputs = correlated_layer(rows=4, cols=16, tokens=700)
    stats = statistics(inputs)
    assert torch.allclose(stats.hessian(), 2 * inputs.T @ inputs / 700, rtol=1e-4, atol=1e-4)
    assert torch.allclose(stats.column_norms(), inputs.norm(dim=0), rtol=1e-4)


def test_the_upper_band_accumulation_gives_the_full_hessian():
    from pruning_core.stats import InputStatistics

    generator = torch.Generator().manual_seed(3)
    stats = InputStatistics(37, "cpu", with_hessian=True)
    batches = [torch.randn(50, 37, generator=generator, dtype=torch.float64).float() for _ in range(3)]
    for batch in batches:
        stats.add_batch(batch)
    x = torch.cat(batches).double()
    expected = 2 * x.T @ x / len(x)
    hessian = stats.hessian()
    assert torch.equal(hessian, hessian.T)
    assert torch.allclose(hessian.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(stats.column_norms().double() ** 2, (x**2).sum(0), rtol=1e-5)
