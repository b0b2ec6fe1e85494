"""Every family's ``__call__`` follows laplace-torch's ``la(x)`` convention; ``predict(x)`` keeps the Predictive.

Regression: ``(f_mu (B, C), f_var (B, C, C))``, the distribution of f without observation noise (the noise is
added by ``predict(x).with_noise(sigma)``, so ported code that adds sigma^2 counts it once). Classification: the
class probabilities of ``predict(x)`` under the call's link.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from posthoc import Laplace, ScaLLA, Streamlined
from posthoc.fiber import FiberSampler

SCALLA = dict(n_features=3, steps=5, batch_size=16, n_target_points=24, directions="rademacher", progress=False)
FIBER = dict(n_particles=2, steps=8, burn_in=2, thin=2, step_size=1e-3, batch_size=16, subsample_size=32,
             cg_steps=2, n_check=2, progress=False)


def _task(likelihood: str) -> tuple[nn.Module, DataLoader, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, generator=generator, dtype=torch.float64)
    n_out = 2 if likelihood == "regression" else 3
    y = torch.randn(48, 2, generator=generator, dtype=torch.float64) if likelihood == "regression" else \
        torch.randint(0, 3, (48,), generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, n_out)).double().eval()
    return model, DataLoader(TensorDataset(x, y), batch_size=16), x[:5]


def _fitted(family: str, likelihood: str) -> tuple[object, torch.Tensor]:
    model, loader, x = _task(likelihood)
    noise = {"sigma_noise": 0.3} if likelihood == "regression" else {}
    if family == "scalla":
        return ScaLLA(model, likelihood, **noise, **SCALLA).fit(loader), x
    if family == "fiber":
        return FiberSampler(model, likelihood, seed=0, **noise, **FIBER).fit(loader), x
    la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure="full", **noise).fit(loader)
    return (la if family == "laplace" else Streamlined(model, posterior=la)), x


@pytest.mark.parametrize("family", ["laplace", "scalla", "fiber", "streamlined"])
def test_regression_call_is_f_mu_f_var_without_noise(family: str) -> None:
    method, x = _fitted(family, "regression")
    kwargs = {"seed": 3} if family == "fiber" else {}
    out = method(x, **kwargs)
    assert isinstance(out, tuple) and len(out) == 2
    f_mu, f_var = out
    pred = method.predict(x, **kwargs)
    assert f_mu.shape == (5, 2) and f_var.shape == (5, 2, 2)
    torch.testing.assert_close(f_mu, pred.mean)
    torch.testing.assert_close(f_var, pred.cov)  # no sigma^2 added
    noisy = pred.with_noise(0.3).cov
    torch.testing.assert_close(noisy - f_var, 0.09 * torch.eye(2, dtype=f_var.dtype).expand(5, 2, 2))


@pytest.mark.parametrize("family", ["scalla", "fiber", "streamlined"])
def test_classification_call_is_the_predictives_probabilities(family: str) -> None:
    method, x = _fitted(family, "classification")
    if family == "fiber":
        probs, expected = method(x, seed=3), method.predict(x, seed=3).probs("mc")
    else:
        probs, expected = method(x, link_approx="probit"), method.predict(x).probs("probit")
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, dtype=probs.dtype))
