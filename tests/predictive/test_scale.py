"""The validation variance scale: exact optimum on a case with a closed form, scaling, bad input."""

import pytest
import torch

from posthoc.metrics import nll
from posthoc.predictive import GaussianPredictive
from posthoc.predictive.links import probit
from posthoc.predictive.scale import fit_variance_scale, scale_predictive


def test_regression_scale_is_the_closed_form_optimum():
    # var = 1, noise sigma = 1, y ~ N(0, 3): the Gaussian NLL of N(0, k + 1) is minimised at k = mean(y^2) - 1
    # exactly, so the fit must match it to the golden-section tolerance, whatever the sample.
    g = torch.Generator().manual_seed(0)
    y = torch.randn(5000, 2, generator=g, dtype=torch.float64) * 3**0.5
    pred = GaussianPredictive(torch.zeros(5000, 2, dtype=torch.float64), var=torch.ones(5000, 2, dtype=torch.float64))
    k = fit_variance_scale(pred, y, "regression", sigma_noise=1.0)
    assert k == pytest.approx(float(y.square().mean()) - 1, rel=1e-6)


def test_classification_scale_minimises_the_probit_nll_over_the_grid():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(400, 3, generator=g, dtype=torch.float64) * 3
    var = torch.rand(400, 3, generator=g, dtype=torch.float64) * 5
    # labels drawn from softmax(mean / 2): the means are overconfident, so the optimum is inside the bounds
    y = torch.multinomial(torch.softmax(mean / 2, -1), 1, generator=g)[:, 0]
    k = fit_variance_scale(GaussianPredictive(mean, var=var), y, "classification")
    assert 1e-3 < k < 1e3
    best = nll(probit(mean, k * var), y)
    for other in (k * 0.9, k * 1.1, 1.0):
        assert best <= nll(probit(mean, other * var), y) + 1e-12


def test_scale_predictive_scales_covariances_and_variances():
    cov = torch.tensor([[[2.0, 0.5], [0.5, 1.0]]])
    mean = torch.zeros(1, 2)
    torch.testing.assert_close(scale_predictive(GaussianPredictive(mean, cov=cov), 3.0).cov, 3 * cov)
    torch.testing.assert_close(scale_predictive(GaussianPredictive(mean, var=torch.ones(1, 2)), 0.5).var,
                               torch.full((1, 2), 0.5))
    with pytest.raises(ValueError, match="> 0"):
        scale_predictive(GaussianPredictive(mean, cov=cov), 0.0)
    with pytest.raises(ValueError, match="bounds"):
        fit_variance_scale(GaussianPredictive(mean, cov=cov), torch.tensor([0]), "classification", bounds=(1.0, 0.1))
