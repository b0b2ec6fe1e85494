"""The diagonal mode's last Linear with fewer inputs than outputs returns its covariance as F Fᵀ + diag(d).

Reference (float64): a two-layer linear network with a diagonal weight posterior, where the diagonal mode is exact
(the hidden units are independent: each depends on its own row of W₁), so the output covariance is, by hand,
W₂ Σ_h W₂ᵀ + diag(Σ_i Var(W₂,ci) (μ_i² + Σ_h,ii) + Var(b₂,c)).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from posthoc.predictive.batching import concat
from posthoc.streamlined import Streamlined
from posthoc.streamlined.rules.affine import LinearStep

DTYPE = torch.float64


def _network_and_posterior(d_in: int = 3, hidden: int = 4, classes: int = 11):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Linear(hidden, classes)).to(DTYPE).eval()
    gen = torch.Generator().manual_seed(1)
    variances = {name: 0.1 * torch.rand(p.shape, generator=gen, dtype=DTYPE) for name, p in model.named_parameters()}
    return model, variances


def _exact_cov(model: nn.Sequential, variances: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    first, second = model[0], model[1]
    hidden_mean = first(x)
    hidden_var = x.square() @ variances["0.weight"].T + variances["0.bias"]
    cov = (second.weight * hidden_var.unsqueeze(1)) @ second.weight.T
    noise = (hidden_mean.square() + hidden_var) @ variances["1.weight"].T + variances["1.bias"]
    return cov + torch.diag_embed(noise)


def test_factored_output_equals_the_exact_covariance_and_model_output():
    model, variances = _network_and_posterior()
    x = torch.randn(5, 3, dtype=DTYPE)
    pred = Streamlined(model, weight_var=variances).predict(x)
    assert pred.cov_factor is not None and pred.cov_factor.shape == (5, 11, 4)
    torch.testing.assert_close(pred.mean, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred.cov, _exact_cov(model, variances, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred.var, torch.diagonal(_exact_cov(model, variances, x), dim1=1, dim2=2),
                               rtol=1e-12, atol=1e-12)


def test_factored_and_dense_routes_give_the_same_predictive(monkeypatch: pytest.MonkeyPatch):
    model, variances = _network_and_posterior()
    x = torch.randn(7, 3, dtype=DTYPE)
    sp = Streamlined(model, weight_var=variances, batch_size=3)  # three chunks, joined factored
    factored = sp.predict(x)
    sensitivity = sp.input_sensitivity(x, 0.2)
    assert factored.cov_factor is not None and sensitivity.cov_factor is not None
    monkeypatch.setattr(LinearStep, "factored_output", lambda self, var_in: None)
    dense = Streamlined(model, weight_var=variances, batch_size=3).predict(x)
    assert dense.cov_factor is None
    torch.testing.assert_close(factored.cov, dense.cov, rtol=1e-12, atol=1e-12)
    for link in ("probit", "probit_centred"):
        torch.testing.assert_close(factored.probs(link), dense.probs(link), rtol=1e-12, atol=1e-12)
    dense_sensitivity = Streamlined(model, weight_var=variances).input_sensitivity(x, 0.2)
    torch.testing.assert_close(sensitivity.cov, dense_sensitivity.cov, rtol=1e-12, atol=1e-12)
    joined = concat([factored, factored])
    assert joined.cov_factor is not None


def test_variance_scale_fit_reads_the_factored_predictive():
    model, variances = _network_and_posterior()
    x = torch.randn(40, 3, dtype=DTYPE)
    y = model(x).argmax(-1)
    sp = Streamlined(model, weight_var=variances)
    scale = sp.fit_variance_scale([(x, y)])
    scaled = sp.predict(x)
    assert scaled.cov_factor is not None
    torch.testing.assert_close(scaled.cov, scale * _exact_cov(model, variances, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("classes", [3, 4])
def test_heads_no_wider_than_their_input_keep_the_dense_covariance(classes: int):
    model, variances = _network_and_posterior(classes=classes)
    pred = Streamlined(model, weight_var=variances).predict(torch.randn(2, 3, dtype=DTYPE))
    assert pred.cov_factor is None and pred.has_full_cov
