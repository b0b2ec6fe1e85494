"""ScaLLA's latent posterior in a float32 model: the m x m algebra runs in float64 (posthoc.scalla.posterior).

In float32 the eigenvalues of H carry an absolute error of about eps lambda_max(H); with a wide spectrum and a small
delta that error is larger than s lam + delta in the weak directions, and the variances there came out wrong by
orders of magnitude without a word. The reference is the dense float64 formula phi^T (s H + delta I)^-1 phi with H
summed in float64 from the same float32 features.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from posthoc import ScaLLA
from posthoc.scalla.posterior import LatentPosterior, batch_precision


def _wide_spectrum_features(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """(n, m, 1) float32 features whose Gram matrix has eigenvalues from about n 1e4 down to about n 1e-10."""
    scales = torch.logspace(2, -5, m)
    return (torch.randn(n, m, generator=generator) * scales).unsqueeze(-1).float()


def _dense_reference(train: torch.Tensor, test: torch.Tensor, delta: float, scale: float) -> torch.Tensor:
    h = torch.einsum("nmc,nkc->mk", train.double(), train.double())
    sigma = torch.linalg.inv(scale * h + delta * torch.eye(h.shape[0], dtype=torch.float64))
    return torch.einsum("bmc,mk,bkd->bcd", test.double(), sigma, test.double())


@pytest.mark.parametrize("delta", [1e-4, 1e-2, 1.0])
def test_float32_features_give_the_float64_covariance(delta):
    g = torch.Generator().manual_seed(0)
    train, test = _wide_spectrum_features(2000, 24, g), _wide_spectrum_features(16, 24, g)
    ones = torch.ones(train.shape[0], 1, 1)
    precision = batch_precision(train, ones)
    assert precision.dtype == torch.float64
    posterior = LatentPosterior(precision, torch.tensor(0.0), 2000, 1, torch.tensor(1.0), 100)
    cov = posterior.covariance(test, torch.tensor(delta), torch.tensor(4.0))
    assert cov.dtype == torch.float32
    reference = _dense_reference(train, test, delta, 4.0)
    torch.testing.assert_close(cov.double(), reference, rtol=1e-5, atol=0.0)
    logdet = posterior.logdet_precision(torch.tensor(delta), torch.tensor(4.0))
    assert logdet.dtype == torch.float32
    expected = torch.linalg.slogdet(4.0 * precision + delta * torch.eye(24, dtype=torch.float64))[1]
    torch.testing.assert_close(logdet.double(), expected, rtol=1e-6, atol=0.0)


def test_logdet_stays_differentiable_in_delta_and_scale():
    g = torch.Generator().manual_seed(1)
    posterior = LatentPosterior(batch_precision(_wide_spectrum_features(50, 6, g), torch.ones(50, 1, 1)),
                                torch.tensor(0.0), 50, 1, torch.tensor(1.0), 10)
    log_delta, log_scale = torch.zeros((), requires_grad=True), torch.zeros((), requires_grad=True)
    posterior.logdet_precision(log_delta.exp(), log_scale.exp()).backward()
    lam = posterior.eigenvalues
    torch.testing.assert_close(log_delta.grad.double(), (1.0 / (lam + 1.0)).sum(), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(log_scale.grad.double(), (lam / (lam + 1.0)).sum(), rtol=1e-6, atol=0.0)


def test_scalla_regression_variances_match_the_float64_formula_at_small_delta():
    """End to end: a float32 MLP on 1-D data with a gap, 2,000 points (lambda_max(s H) ~ 1e7)."""
    torch.manual_seed(0)
    x = torch.cat([torch.rand(1000, 1) * 2 - 3, torch.rand(1000, 1) * 2 + 1])
    y = torch.sin(2 * x) + 0.1 * torch.randn_like(x)
    model = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = ScaLLA(model, "regression", sigma_noise=0.1, n_features=20, steps=200, progress=False)
        s.fit(DataLoader(TensorDataset(x, y), batch_size=256))
    xt = torch.linspace(-6, 6, 49)[:, None]
    with torch.no_grad():
        train_features, test_features = s.features(x), s.features(xt)
    s.prior_precision = torch.tensor(1e-4)
    scale = float(s.factors.scale(s.sigma_noise))
    reference = _dense_reference(train_features, test_features, 1e-4, scale)
    torch.testing.assert_close(s.predict(xt).cov.double(), reference, rtol=1e-4, atol=0.0)
