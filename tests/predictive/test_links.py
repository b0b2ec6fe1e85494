"""Link approximations against their limits and exact identities (float64)."""

import math

import numpy as np
import pytest
import torch

from posthoc.predictive import GaussianPredictive
from posthoc.predictive.links import bridge_alpha, laplace_bridge, make_generator, mc_probs, probit

pytestmark = pytest.mark.usefixtures("float64_default")


def _random_cov(batch: int, n: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    return scale * (a @ a.transpose(-1, -2) / n + 0.1 * torch.eye(n, dtype=torch.float64))


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2


def test_probit_is_softmax_at_small_variance(logits):
    var = torch.full_like(logits, 1e-10)
    torch.testing.assert_close(probit(logits, var), torch.softmax(logits, -1), atol=1e-9, rtol=0)


def test_probit_formula(logits):
    var = torch.rand(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    expected = torch.softmax(logits / torch.sqrt(1 + math.pi / 8 * var), -1)
    torch.testing.assert_close(probit(logits, var), expected)
    # A full covariance uses its diagonal only.
    cov = _random_cov(6, 5, 1.0, 2)
    torch.testing.assert_close(probit(logits, cov), probit(logits, torch.diagonal(cov, dim1=1, dim2=2)))


def test_mc_is_softmax_at_small_variance(logits):
    cov = _random_cov(6, 5, 1e-12, 3)
    probs = mc_probs(logits, cov, 50, make_generator(0))
    torch.testing.assert_close(probs, torch.softmax(logits, -1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("full", [False, True])
def test_mc_converges_to_exact_expectation_1d(full):
    # Logits (z, 0) with z ~ N(m, s^2): softmax_0 = sigmoid(z). E[sigmoid(z)] by
    # 200-point Gauss-Hermite quadrature (exact to ~1e-15 for this smooth integrand).
    m, s = 0.7, 2.0
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    exact = float(np.sum(weights / (1 + np.exp(-(m + s * nodes)))) / np.sqrt(2 * np.pi))
    mean = torch.tensor([[m, 0.0]])
    var = torch.tensor([[s**2, 0.0]])
    cov_or_var = torch.diag_embed(var) if full else var
    n = 200_000
    p0 = float(mc_probs(mean, cov_or_var, n, make_generator(123))[0, 0])
    # standard error of the MC mean of sigmoid(z): sd(sigmoid(z)) / sqrt(n)
    z = m + s * torch.randn(n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    se = float(torch.sigmoid(z).std()) / math.sqrt(n)
    assert abs(p0 - exact) < 4 * se, (p0, exact, se)
    # and MC is not trivially the plug-in softmax: the variance pulls it towards 1/2
    assert abs(exact - 1 / (1 + math.exp(-m))) > 50 * se


def test_bridge_two_classes_matches_softmax():
    mean = torch.tensor([[1.3, -0.4], [0.0, 2.0]])
    for v in (1e-8, 0.5, 10.0):
        probs = laplace_bridge(mean, torch.full_like(mean, v))
        torch.testing.assert_close(probs, torch.softmax(mean, -1))


def test_bridge_inverts_dirichlet_laplace_moments():
    # The Laplace approximation of Dir(alpha) in the softmax basis has
    # mu_k = log a_k - mean_l log a_l, Sigma_kk = (1 - 2/C)/a_k + sum_l (1/a_l) / C^2.
    # The bridge (without the zero-mean projection, which would alter this
    # diagonal) must map these moments back to alpha exactly.
    alpha = torch.tensor([[0.5, 2.0, 7.0, 1.1], [3.0, 3.0, 3.0, 3.0], [40.0, 0.2, 1.0, 5.0]])
    n_classes = alpha.shape[-1]
    mu = alpha.log() - alpha.log().mean(-1, keepdim=True)
    var = (1 - 2 / n_classes) / alpha + (1 / alpha).sum(-1, keepdim=True) / n_classes**2
    torch.testing.assert_close(bridge_alpha(mu, var, correction=False), alpha)
    torch.testing.assert_close(laplace_bridge(mu, var, correction=False), alpha / alpha.sum(-1, keepdim=True))


def test_bridge_is_not_softmax_at_zero_variance_for_three_classes():
    mean = torch.tensor([[2.0, 0.0, -1.0]])
    probs = laplace_bridge(mean, torch.full_like(mean, 1e-9))
    assert (probs - torch.softmax(mean, -1)).abs().max() > 1e-2


def test_bridge_correction_invariant_to_shared_offset(logits):
    cov = _random_cov(6, 5, 0.5, 4)
    shift = torch.randn(6, 1, dtype=torch.float64)
    ones = torch.ones(5, 5, dtype=torch.float64)
    shifted = laplace_bridge(logits + shift, cov + 3.0 * ones)
    torch.testing.assert_close(shifted, laplace_bridge(logits, cov))
    # diagonal input equals the same covariance given in full
    var = torch.rand(6, 5, dtype=torch.float64) + 0.1
    torch.testing.assert_close(laplace_bridge(logits, var), laplace_bridge(logits, torch.diag_embed(var)))


def test_bridge_rejects_zero_variance(logits):
    with pytest.raises(ValueError, match="probit"):
        GaussianPredictive(logits, var=torch.zeros_like(logits)).probs("bridge")
