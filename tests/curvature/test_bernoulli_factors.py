"""Output factors of independent Bernoulli outputs (likelihood "binary") against torch.func references in float64."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, hessian

from posthoc.curvature.output_factors import OutputFactors, log_likelihood, log_likelihood_terms
from posthoc.likelihood import Likelihood

DTYPE = torch.float64


def bce(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log p(y | f) of one example, written out (not torch's BCE): sum_k softplus(f_k) - y_k f_k."""
    return (torch.log1p(torch.exp(f)) - y * f).sum()


def logits_and_targets(n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n_out)
    f = 2 * torch.randn(5, n_out, generator=g, dtype=DTYPE)
    y = (torch.rand(5, n_out, generator=g, dtype=DTYPE) < 0.5).to(DTYPE)
    return f, y


@pytest.mark.parametrize("n_out", [1, 3])
def test_ggn_factor_is_a_root_of_the_bce_hessian(n_out):
    f, y = logits_and_targets(n_out)
    s = OutputFactors("binary", "ggn")(f, y)
    assert s.shape == (5, n_out, n_out)
    reference = torch.stack([hessian(bce)(f[i], y[i]) for i in range(5)])
    torch.testing.assert_close(s @ s.transpose(1, 2), reference, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n_out", [1, 3])
def test_empirical_fisher_factor_is_the_bce_gradient(n_out):
    f, y = logits_and_targets(n_out)
    s = OutputFactors("binary", "ef")(f, y)
    assert s.shape == (5, n_out, 1)
    reference = torch.stack([grad(bce)(f[i], y[i]) for i in range(5)])
    torch.testing.assert_close(s[..., 0], reference, rtol=1e-12, atol=1e-14)


def test_mc_factor_is_unbiased_for_the_hessian():
    f, y = logits_and_targets(3)
    samples = 40_000
    s = OutputFactors("binary", "ggn_mc", mc_samples=samples, seed=0)(f, y)
    assert s.shape == (5, 3, samples)
    p = torch.sigmoid(f)
    # each entry averages 40,000 terms bounded by 1: standard error <= 0.5 / 200 = 0.0025
    torch.testing.assert_close(s @ s.transpose(1, 2), torch.diag_embed(p * (1 - p)), rtol=0, atol=0.015)
    # sampled labels are 0 or 1: every column entry is p - 0 or p - 1 (times 1 / sqrt(M))
    column = s[..., 0] * samples**0.5
    assert bool(((column - p).abs() < 1e-12).logical_or((column - p + 1).abs() < 1e-12).all())


def test_mc_factor_is_seeded():
    f, y = logits_and_targets(3)
    first = OutputFactors("binary", "ggn_mc", mc_samples=4, seed=7)(f, y)
    again = OutputFactors("binary", "ggn_mc", mc_samples=4, seed=7)(f, y)
    torch.testing.assert_close(first, again, rtol=0, atol=0)


@pytest.mark.parametrize("n_out", [1, 3])
def test_log_likelihood_is_minus_the_summed_bce(n_out):
    f, y = logits_and_targets(n_out)
    stat = log_likelihood_terms(f, y, Likelihood.BINARY)
    expected = -sum(bce(f[i], y[i]) for i in range(5))
    torch.testing.assert_close(stat, expected)
    # no noise enters: the statistic is log p(D | theta) itself
    torch.testing.assert_close(log_likelihood(stat, 5 * n_out, Likelihood.BINARY, torch.tensor(1.0, dtype=DTYPE)),
                               stat)


def test_curvature_is_not_rescaled_by_a_noise():
    for curvature in ("ggn", "ggn_mc", "ef"):
        scale = OutputFactors("binary", curvature).scale(torch.tensor(2.0, dtype=DTYPE))
        assert float(scale) == 1.0
