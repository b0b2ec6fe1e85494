"""LayerNorm with the expected spread of its random input (``layernorm="expected"``), float64.

The frozen rule divides the input's variance by s(μ)², the spread of the mean input; when the input's noise is
larger than that spread it amplifies what the real LayerNorm bounds. The expected rule divides by
s(μ)² + (1 - 1/D) mean_j Var x_j instead. Checked: the exact formula behind one random Linear, the frozen rule
as its small-variance limit, the mean == model(x), and Monte Carlo where the noise dominates.
"""

import pytest
import torch
from streamlined.mc import mc_moments, mean_field_sampler, total_ratio
from torch import nn

from posthoc.streamlined import Streamlined

DTYPE = torch.float64


def _model(seed: int = 0, width: int = 8, spread: float = 1.0) -> nn.Module:
    """Linear(4, width) -> LayerNorm(width) -> Linear(width, 3); ``spread`` scales how the first layer's outputs differ."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, width), nn.LayerNorm(width), nn.Linear(width, 3)).to(DTYPE)
    with torch.no_grad():
        model[0].weight.mul_(spread)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_(0, 0.2)
    return model.eval()


def _variances(model: nn.Module, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"0.weight": scale * torch.rand(model[0].weight.shape, generator=g, dtype=DTYPE),
            "0.bias": scale * torch.rand(model[0].bias.shape, generator=g, dtype=DTYPE)}


def test_expected_rule_equals_its_formula_behind_one_random_linear():
    model = _model()
    head = nn.Sequential(model[0], model[1])  # the LayerNorm's output is the model's output
    variances = _variances(model, 0.3)
    x = torch.randn(5, 4, dtype=DTYPE)
    pred = Streamlined(head, weight_var=variances, layernorm="expected", likelihood="regression").predict(x)
    with torch.no_grad():
        mu = model[0](x)
        var_in = x.square() @ variances["0.weight"].T + variances["0.bias"]  # exact for a deterministic input
        spread = mu.var(-1, unbiased=False, keepdim=True) + model[1].eps
        expected_sq = spread + (1 - 1 / mu.shape[-1]) * var_in.mean(-1, keepdim=True)
        var_out = model[1].weight.square() * var_in / expected_sq
        torch.testing.assert_close(pred.mean, head(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.diagonal(pred.cov, dim1=-2, dim2=-1), var_out, rtol=1e-10, atol=1e-14)


def test_small_variances_give_the_frozen_rule():
    model = _model()
    variances = _variances(model, 1e-9)
    x = torch.randn(5, 4, dtype=DTYPE)
    frozen = Streamlined(model, weight_var=variances, layernorm="frozen").predict(x)
    expected = Streamlined(model, weight_var=variances, layernorm="expected").predict(x)
    torch.testing.assert_close(expected.mean, model(x).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(expected.cov, frozen.cov, rtol=1e-6, atol=1e-20)


@pytest.mark.parametrize("spread, scale", [(0.05, 0.2), (1.0, 0.3)])
def test_noise_larger_than_the_spread_is_not_amplified(spread, scale):
    """Input noise above the mean's spread: the frozen rule overshoots Monte Carlo, expected does not.

    Measured (20,000 draws, total's relative SE 0.003): frozen 4.55 / 4.96 of MC, linearised 3.54 / 3.74,
    expected 1.087 / 1.106 (diagonal mode; the remaining 9-11% is not analysed here).
    """
    model = _model(spread=spread)
    variances = _variances(model, scale)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    reference = mc_moments(model, x, mean_field_sampler(model, variances))
    frozen = Streamlined(model, weight_var=variances, layernorm="frozen").predict(x)
    expected = Streamlined(model, weight_var=variances, layernorm="expected").predict(x)
    frozen_ratio = total_ratio(torch.diagonal(frozen.cov, dim1=-2, dim2=-1), reference)
    expected_ratio = total_ratio(torch.diagonal(expected.cov, dim1=-2, dim2=-1), reference)
    assert frozen_ratio > 3.0
    assert 0.9 < expected_ratio < 1.2
