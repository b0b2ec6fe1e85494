"""Every link stays finite where probit is: huge logit gaps, zero, tiny and huge variances, float32 and float64.

The Laplace bridge used to compute e^{mu_k} sum_l e^{-mu_l} directly, which overflows for a float32
logit gap of about 89 (p = 1) and returned NaN probabilities; it is now computed in log space. On
moderate inputs it must give the same values as that formula (checked in float64).
"""

import pytest
import torch

from posthoc.predictive import GaussianPredictive, SamplePredictive
from posthoc.predictive.links import laplace_bridge, probit

DTYPES = (torch.float32, torch.float64)
LINKS = ("probit", "bridge", "mc")


def _gaps(dtype: torch.dtype) -> list[float]:
    # up to finfo.max ** 0.75: logits that large are finite, and so are their differences
    return [0.0, 1.0, 30.0, 89.0, 90.0, 200.0, 1e4, torch.finfo(dtype).max ** 0.75]


def _variances(dtype: torch.dtype) -> list[float]:
    finfo = torch.finfo(dtype)
    return [0.0, finfo.tiny * 4, 1e-30, 1e-3, 1.0, 1e4, 1e30, finfo.max / 16]


def _mean(gap: float, n_classes: int, dtype: torch.dtype) -> torch.Tensor:
    pattern = torch.tensor([1.0, 0.0, -0.5, 0.25][:n_classes], dtype=torch.float64)
    rows = torch.stack([gap * pattern, -gap * pattern, gap * pattern.roll(1)])
    return rows.to(dtype)


def _full_cov(var: float, n_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """A dense covariance with correlated logits whose largest variance is ``var`` (built in float64)."""
    g = torch.Generator().manual_seed(n_classes)
    a = torch.randn(3, n_classes, n_classes, generator=g, dtype=torch.float64)
    k = a @ a.transpose(-1, -2) + 0.1 * torch.eye(n_classes, dtype=torch.float64)
    k = k / torch.diagonal(k, dim1=-2, dim2=-1).amax(-1)[:, None, None]
    cov = (k * var).to(dtype)
    return 0.5 * (cov + cov.transpose(-1, -2))


def _check_probs(probs: torch.Tensor, dtype: torch.dtype) -> None:
    assert probs.dtype == dtype
    assert bool(torch.isfinite(probs).all()), probs
    assert bool((probs >= 0).all()) and bool((probs <= 1).all()), probs
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0], dtype=dtype), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", [1, 2, 4])
@pytest.mark.parametrize("full", [False, True])
def test_every_link_finite_on_extreme_grid(dtype, n_classes, full):
    for gap in _gaps(dtype):
        mean = _mean(gap, n_classes, dtype)
        for var in _variances(dtype):
            if full:
                pred = GaussianPredictive(mean, cov=_full_cov(var, n_classes, dtype))
            else:
                pred = GaussianPredictive(mean, var=torch.full_like(mean, var))
            _check_probs(probit(pred.mean, pred.cov if full else pred.var), dtype)
            for link in LINKS:
                if link == "bridge" and var == 0.0 and n_classes > 1:
                    with pytest.raises(ValueError, match="probit"):  # undefined there: a clear error, not NaN
                        pred.probs(link)
                    continue
                probs = pred.probs(link, n_samples=64)
                _check_probs(probs, dtype)
                if gap >= 90 and 0 < var <= 1.0 and n_classes > 1:
                    # a logit gap of 90+ with unit variance: every link puts all mass on the top class
                    top = mean.argmax(-1)
                    assert bool((probs.gather(-1, top[:, None]) > 0.99).all()), (link, gap, var, probs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bridge_huge_float32_gap_is_one_hot(dtype):
    # the reported case: a float32 logit gap of 90 gave NaN for the top class
    mean = torch.tensor([[90.0, 0.0], [0.0, 300.0], [1e6, -1e6]], dtype=dtype)
    probs = laplace_bridge(mean, torch.ones_like(mean))
    torch.testing.assert_close(probs, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=dtype),
                               atol=1e-30, rtol=0)


def test_sample_predictive_links_finite_for_huge_logits():
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(50, 3, 4, generator=g) + torch.tensor([95.0, 0.0, -10.0, 3.0])
    pred = SamplePredictive(samples.float())
    for link in LINKS:
        _check_probs(pred.probs(link), torch.float32)


def _old_bridge(mean: torch.Tensor, cov_or_var: torch.Tensor, correction: bool) -> torch.Tensor:
    """The formula as written before the log-space version (exact wherever it does not overflow)."""
    n_classes = mean.shape[-1]
    if correction:
        mean = mean - mean.mean(dim=-1, keepdim=True)
        if cov_or_var.ndim == 3:
            centred = cov_or_var - cov_or_var.mean(dim=-1, keepdim=True)
            centred = centred - centred.mean(dim=-2, keepdim=True)
            var = torch.diagonal(centred, dim1=-2, dim2=-1)
        else:
            var = cov_or_var * (1.0 - 2.0 / n_classes) + cov_or_var.sum(-1, keepdim=True) / n_classes**2
    else:
        var = torch.diagonal(cov_or_var, dim1=-2, dim2=-1) if cov_or_var.ndim == 3 else cov_or_var
    alpha = (1.0 - 2.0 / n_classes + torch.exp(mean) * torch.exp(-mean).sum(-1, keepdim=True) / n_classes**2) / var
    return alpha / alpha.sum(-1, keepdim=True)


@pytest.mark.parametrize("n_classes", [2, 3, 10])
@pytest.mark.parametrize("correction", [True, False])
def test_bridge_unchanged_on_moderate_inputs(n_classes, correction):
    g = torch.Generator().manual_seed(n_classes)
    mean = 4.0 * torch.randn(64, n_classes, generator=g, dtype=torch.float64)
    var = torch.exp(torch.empty(64, n_classes, dtype=torch.float64).uniform_(-5, 3, generator=g))
    torch.testing.assert_close(laplace_bridge(mean, var, correction), _old_bridge(mean, var, correction),
                               rtol=1e-12, atol=1e-15)
    cov = _full_cov(5.0, n_classes, torch.float64).repeat(22, 1, 1)[:64]
    torch.testing.assert_close(laplace_bridge(mean, cov, correction), _old_bridge(mean, cov, correction),
                               rtol=1e-12, atol=1e-15)
