"""Regression metrics: agreement with torch.distributions.Normal, unit conversion, shapes."""

import math

import pytest
import torch

from posthoc.metrics import gaussian_nll, rmse


def _data(n: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, generator=g, dtype=torch.float64)
    var = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    y = mean + var.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    return mean, var, y


def test_gaussian_nll_matches_torch_normal():
    mean, var, y = _data()
    ref = -float(torch.distributions.Normal(mean, var.sqrt()).log_prob(y).mean())
    assert gaussian_nll(mean, var, y) == pytest.approx(ref, abs=1e-10)
    assert gaussian_nll(mean[:, None], var[:, None], y[:, None]) == pytest.approx(ref, abs=1e-10)


def test_gaussian_nll_original_units():
    mean, var, y = _data(seed=1)
    scale, shift = 3.7, -12.0
    # Density of the de-standardised target, evaluated directly in original units.
    ref = -float(torch.distributions.Normal(mean * scale + shift, var.sqrt() * scale).log_prob(y * scale + shift).mean())
    assert gaussian_nll(mean, var, y, y_scale=scale) == pytest.approx(ref, abs=1e-10)
    assert gaussian_nll(mean, var, y, y_scale=scale) == pytest.approx(gaussian_nll(mean, var, y) + math.log(scale))


def test_gaussian_nll_hand_value():
    # y = mean, var = 1: NLL = ½ log 2π
    z = torch.zeros(3)
    assert gaussian_nll(z, torch.ones(3), z) == pytest.approx(0.5 * math.log(2 * math.pi))


def test_rmse():
    mean = torch.tensor([0.0, 1.0, 2.0, 3.0])
    y = torch.tensor([1.0, 1.0, 0.0, 3.0])  # squared errors 1, 0, 4, 0 -> mse 1.25
    assert rmse(mean, y) == pytest.approx(math.sqrt(1.25))
    assert rmse(mean, y, y_scale=2.0) == pytest.approx(2 * math.sqrt(1.25))
    assert rmse(mean[:, None], y[:, None]) == pytest.approx(math.sqrt(1.25))


def test_shape_mismatch_rejected():
    mean, var, y = _data(5)
    with pytest.raises(ValueError, match="shape mismatch"):
        gaussian_nll(mean, var, y[:, None])
    with pytest.raises(ValueError, match="shape mismatch"):
        rmse(mean[:, None], y)
    with pytest.raises(ValueError, match="shape mismatch"):
        rmse(mean, y[:4])
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, 1\)"):
        rmse(torch.ones(5, 2), torch.ones(5, 2))


def test_bad_values_rejected():
    mean, var, y = _data(5)
    with pytest.raises(ValueError, match="var must be > 0"):
        gaussian_nll(mean, torch.zeros(5, dtype=torch.float64), y)
    with pytest.raises(ValueError, match="NaN"):
        gaussian_nll(mean, var, torch.full((5,), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="y_scale"):
        rmse(mean, y, y_scale=0.0)
    with pytest.raises(ValueError, match="empty"):
        rmse(torch.zeros(0), torch.zeros(0))
    with pytest.raises(TypeError):
        rmse(torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long))
