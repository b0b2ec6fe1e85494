"""posthoc.network.positions: outputs (B, ..., C) read as one likelihood output per position."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from posthoc import Laplace, ScaLLA
from posthoc.curvature.output_factors import OutputFactors
from posthoc.fiber import FiberSampler
from posthoc.likelihood import Likelihood
from posthoc.network.positions import (
    PositionFactors,
    as_rows,
    check_layout,
    check_position_targets,
    kept_positions,
    observations,
    position_blocks,
)

DTYPE = torch.float64
CLS, REG = Likelihood.CLASSIFICATION, Likelihood.REGRESSION


def logits_and_labels() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 4, 5, generator=g, dtype=DTYPE)  # (B, T, C)
    y = torch.randint(0, 5, (3, 4), generator=g)
    y[0, 1] = -100
    y[2, :] = -100
    return f, y


def test_block_diagonal_factors_give_the_per_position_hessians_and_zero_at_ignored_positions():
    f, y = logits_and_labels()
    s = PositionFactors(OutputFactors(CLS), 5, CLS)(f.flatten(1), y)
    assert s.shape == (3, 4 * 5, 4 * 4)  # K = C - 1 columns per position
    gamma = s @ s.transpose(1, 2)  # (B, T·C, T·C)
    p = torch.softmax(f, -1)
    expected = torch.zeros(3, 20, 20, dtype=DTYPE)
    for b in range(3):
        for t in range(4):
            if y[b, t] != -100:
                block = torch.diag(p[b, t]) - torch.outer(p[b, t], p[b, t])
                expected[b, t * 5:(t + 1) * 5, t * 5:(t + 1) * 5] = block
    torch.testing.assert_close(gamma, expected)


def test_summed_positions_stack_one_sampled_column_per_position():
    f, y = logits_and_labels()
    rows = OutputFactors(CLS, "ggn_mc", mc_samples=2, seed=3)
    s = PositionFactors(rows, 5, CLS, sum_positions=True)(f.flatten(1), y)
    assert s.shape == (3, 20, 2)
    kept = y != -100
    again = OutputFactors(CLS, "ggn_mc", mc_samples=2, seed=3)(f[kept], y[kept])  # the same draws, in row order
    blocks = s.reshape(3, 4, 5, 2)
    torch.testing.assert_close(blocks[kept], again)
    assert bool((blocks[~kept] == 0).all())


def test_rows_and_counts_skip_ignored_positions():
    f, y = logits_and_labels()
    rows, labels = as_rows(f.flatten(1), y, 5, CLS, -100)
    kept = y != -100
    torch.testing.assert_close(rows, f[kept])
    assert torch.equal(labels, y[kept])
    assert observations(3, y, CLS, -100, position_dims=1) == int(kept.sum()) == 7
    assert observations(3, y, CLS, -100, position_dims=0) == 3
    same = as_rows(f[:, 0], y[:, 0], 5, CLS, -100, position_dims=0)  # (B, C): unchanged
    assert same[0] is f[:, 0] or torch.equal(same[0], f[:, 0])
    targets = torch.randn(3, 4, 5, dtype=DTYPE)
    assert bool(kept_positions(targets, REG, -100).all())  # regression keeps every position


def test_position_blocks_are_the_diagonal_blocks():
    g = torch.Generator().manual_seed(1)
    cov = torch.randn(2, 12, 12, generator=g, dtype=DTYPE)
    blocks = position_blocks(cov, 3)
    assert blocks.shape == (2, 4, 3, 3)
    for t in range(4):
        torch.testing.assert_close(blocks[:, t], cov[:, 3 * t:3 * t + 3, 3 * t:3 * t + 3])


def test_layouts():
    check_layout((2, 5, 3), (2, 5), CLS)
    check_layout((2, 4, 6, 3), (2, 4, 6, 3), REG)
    with pytest.raises(ValueError, match=r"channels first.*movedim\(1, -1\)"):
        check_layout((2, 3, 4, 6), (2, 4, 6), CLS)
    with pytest.raises(ValueError, match=r"targets must be \('B', 5\)"):
        check_layout((2, 5, 3), (2, 4), CLS)


def test_position_targets():
    y = torch.tensor([[0, 2, -100], [1, 1, 0]])
    assert torch.equal(check_position_targets(y, CLS, 3, 1, -100, DTYPE), y)
    with pytest.raises(ValueError, match="labels must lie"):
        check_position_targets(y, CLS, 2, 1, -100, DTYPE)
    with pytest.raises(ValueError, match="2 dimensions"):
        check_position_targets(y[:, 0], CLS, 3, 1, -100, DTYPE)
    with pytest.raises(ValueError, match="regression targets"):
        check_position_targets(torch.zeros(2, 3), REG, 2, 1, -100, DTYPE)
    with pytest.raises(ValueError, match="NaN"):
        check_position_targets(torch.full((2, 3, 2), float("nan")), REG, 2, 1, -100, DTYPE)


def test_summed_sampled_columns_are_unbiased_for_the_block_diagonal_hessian():
    """E[S Sᵀ] over the label draws is blockdiag_t(Gamma_t): the cross-position terms vanish on average."""
    f, y = logits_and_labels()
    draws = 40000
    s = PositionFactors(OutputFactors(CLS, "ggn_mc", mc_samples=draws, seed=0), 5, CLS, sum_positions=True)(
        f.flatten(1), y)
    exact = PositionFactors(OutputFactors(CLS), 5, CLS)(f.flatten(1), y)
    # entries of Gamma are at most 1/4; the Monte Carlo error of an average of 40000 bounded terms is ~ 1/200
    torch.testing.assert_close(s @ s.transpose(1, 2), exact @ exact.transpose(1, 2), rtol=0, atol=0.03)


def test_positions_ignored_in_every_example_get_no_columns():
    f, y = logits_and_labels()
    padded = y.clone()
    padded[:, -1] = -100  # e.g. right padding: the last position has no target anywhere in the batch
    factors = PositionFactors(OutputFactors(CLS), 5, CLS)
    s = factors(f.flatten(1), padded)
    assert s.shape == (3, 20, 3 * 4)
    full = factors(f[:, :-1].flatten(1), padded[:, :-1])  # the same Hessians without the last position
    torch.testing.assert_close((s @ s.transpose(1, 2))[:, :15, :15], full @ full.transpose(1, 2))
    assert bool((s[:, 15:] == 0).all())


@pytest.mark.parametrize("bad", [-100.0, True, torch.tensor(-100), "-100"])
def test_ignore_index_must_be_an_int_in_every_method(bad):
    model = nn.Linear(2, 3)
    for build in (lambda: Laplace(model, "classification", ignore_index=bad),
                  lambda: ScaLLA(model, "classification", ignore_index=bad),
                  lambda: FiberSampler(model, "classification", ignore_index=bad)):
        with pytest.raises(TypeError, match="ignore_index must be an int"):
            build()
