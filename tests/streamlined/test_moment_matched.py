"""Moment-matched activations (``activations="moment_matched"``), float64.

Var g(z) for z ~ N(μ, σ²) against dense integration; behind one random Linear with mean-field weights the
units are independent Gaussians, so the rule is exact there (checked against that closed form); the mean stays
model(x); the functional and traced forms take the same rule; the full mode refuses it.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from posthoc.streamlined import Streamlined
from posthoc.streamlined.rules.activations import gaussian_variance

DTYPE = torch.float64
ACTIVATIONS = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
               "sigmoid": nn.Sigmoid(), "silu": nn.SiLU()}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_gaussian_variance_matches_dense_integration(name):
    module = ACTIVATIONS[name]
    mu = torch.tensor([-2.0, -0.3, 0.0, 0.4, 1.5], dtype=DTYPE)
    var = torch.tensor([0.5, 2.0, 1.0, 0.01, 3.0], dtype=DTYPE)
    t = torch.linspace(-12, 12, 200_001, dtype=DTYPE)[:, None]  # a standard normal grid, trapezoid rule
    density = torch.exp(-0.5 * t * t) / (2 * torch.pi) ** 0.5
    g = module(mu + var.sqrt() * t)
    first = torch.trapezoid(g * density, t, dim=0)
    reference = torch.trapezoid((g - first).square() * density, t, dim=0)
    rtol = 1e-6 if name == "relu" else 5e-3  # ReLU closed form; 32-node Gauss-Hermite's error at σ² = 3 ~1e-3
    torch.testing.assert_close(gaussian_variance(module, mu, var), reference, rtol=rtol, atol=1e-12)
    assert float(gaussian_variance(module, mu, torch.zeros_like(var)).abs().max()) < 1e-12


@pytest.mark.parametrize("name", ["relu", "tanh", "gelu_tanh"])
def test_exact_behind_one_random_linear(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), ACTIVATIONS[name], nn.Linear(5, 2)).to(DTYPE).eval()
    variances = {"0.weight": torch.full((5, 3), 0.4, dtype=DTYPE), "0.bias": torch.full((5,), 0.1, dtype=DTYPE)}
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    pred = Streamlined(model, weight_var=variances, activations="moment_matched").predict(x)
    with torch.no_grad():
        mu = model[0](x)
        var_h = gaussian_variance(model[1], mu, x.square() @ variances["0.weight"].T + variances["0.bias"])
        torch.testing.assert_close(pred.mean, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.diagonal(pred.cov, dim1=-2, dim2=-1), var_h @ model[2].weight.square().T,
                               rtol=1e-10, atol=1e-14)
    linearized = Streamlined(model, weight_var=variances).predict(x)
    assert not torch.allclose(linearized.cov, pred.cov)  # the option changes the rule


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.gelu(self.a(x)))


def test_functional_and_traced_forms_take_the_rule():
    model = _Functional().to(DTYPE).eval()
    twin = nn.Sequential(model.a, nn.GELU(), model.b)
    variances = {"a.weight": torch.full((5, 3), 0.4, dtype=DTYPE)}
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    for graph in ("fx", "export"):
        pred = Streamlined(model, weight_var=variances, activations="moment_matched", graph=graph).predict(x)
        expected = Streamlined(twin, weight_var={"0.weight": variances["a.weight"]},
                               activations="moment_matched").predict(x)
        torch.testing.assert_close(pred.cov, expected.cov, rtol=1e-12, atol=1e-15)


def test_full_mode_refuses_it():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).to(DTYPE)
    with pytest.raises(ValueError, match="diagonal-mode only"):
        Streamlined(model, weight_var={"0.weight": torch.ones(4, 3, dtype=DTYPE)}, activation_covariance="full",
                    activations="moment_matched")


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_gaussian_variance_in_float32_keeps_units_far_from_the_kink(name):
    """float32 gives the float64 variance where σ ≪ |μ| (E[g²] - E[g]² would cancel: ReLU at μ = 100 gave 0)."""
    module = ACTIVATIONS[name]
    mu = torch.tensor([-3.0, -0.5, 0.0, 0.7, 3.0, 10.0, 30.0, 100.0], dtype=DTYPE).repeat(3)
    var = torch.tensor([1e-6, 1e-4, 1.0], dtype=DTYPE).repeat_interleave(8)
    reference = gaussian_variance(module, mu, var)
    got = gaussian_variance(module, mu.float(), var.float()).double()
    big = reference > 1e-3 * var  # tanh and sigmoid saturate: their tiny variances are below float32's resolution
    torch.testing.assert_close(got[big], reference[big], rtol=2e-3, atol=0.0)
    assert float((got - reference).abs().max()) <= 1e-3 * float(var.max())
