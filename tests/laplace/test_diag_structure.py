"""Diagonal structure: curvature and posterior algebra equal the dense references (float64)."""

import pytest
import torch
from references import (
    DTYPE,
    check_logdet_gradient,
    dense_ef,
    dense_ggn,
    dense_jacobians,
    minibatches,
    random_priors,
    small_cnn,
    small_mlp,
)
from torch import nn

from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.structures.diag import DiagCurvature
from posthoc.network.subset import ParameterSubset


def _fit(subset, x, y, likelihood, curvature="ggn", **options):
    return DiagCurvature.fit(subset, minibatches(subset, x, y), OutputFactors(likelihood, curvature), progress=False,
                             **options)


@pytest.mark.parametrize("subset_kind", ["all", "last_layer"])
def test_diag_ggn_classification(classification_data, subset_kind):
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), subset_kind)
    ref = torch.diagonal(dense_ggn(subset, subset.inputs(x), "classification"))
    # a tiny chunk budget forces chunks of one example
    for chunk_bytes in (1, 2**29):
        torch.testing.assert_close(_fit(subset, x, y, "classification", chunk_bytes=chunk_bytes).diagonal, ref,
                                   rtol=1e-10, atol=1e-12)


def test_diag_regression_and_ef(regression_data):
    x, y = regression_data
    subset = ParameterSubset(small_mlp(n_out=1), "all")
    torch.testing.assert_close(_fit(subset, x, y, "regression").diagonal,
                               torch.diagonal(dense_ggn(subset, x, "regression")), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_fit(subset, x, y, "regression", "ef").diagonal,
                               torch.diagonal(dense_ef(subset, x, y, "regression")), rtol=1e-10, atol=1e-12)


def test_diag_cnn_and_ef(image_data):
    x, y = image_data
    subset = ParameterSubset(small_cnn(), "all")
    torch.testing.assert_close(_fit(subset, x, y, "classification").diagonal,
                               torch.diagonal(dense_ggn(subset, x, "classification")), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_fit(subset, x, y, "classification", "ef").diagonal,
                               torch.diagonal(dense_ef(subset, x, y, "classification")), rtol=1e-10, atol=1e-12)


class _Shared(nn.Module):
    """A Linear layer applied twice (weight sharing) and a LayerNorm: both take the generic route."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.tanh(self.inner(torch.tanh(self.inner(x))))))


@pytest.mark.parametrize("with_norm", [True, False])
def test_diag_generic_route(classification_data, with_norm):
    x, y = classification_data
    torch.manual_seed(1)
    model = _Shared().to(DTYPE)
    if not with_norm:
        model.norm.requires_grad_(False)  # only the shared Linear forces the generic route
    subset = ParameterSubset(model, "all")
    torch.testing.assert_close(_fit(subset, x, y, "classification").diagonal,
                               torch.diagonal(dense_ggn(subset, x, "classification")), rtol=1e-10, atol=1e-12)


def test_diag_subnetwork(image_data):
    x, y = image_data
    idx = torch.tensor([0, 7, 20, 33, 60, 81])
    subset = ParameterSubset(small_cnn(), "subnetwork", subnetwork_indices=idx)
    curv = _fit(subset, x, y, "classification")
    torch.testing.assert_close(curv.diagonal, torch.diagonal(dense_ggn(subset, x, "classification")),
                               rtol=1e-10, atol=1e-12)
    jac = dense_jacobians(subset, x)
    torch.testing.assert_close(curv.functional_covariance(x, torch.tensor([1.0], dtype=DTYPE),
                                                          torch.tensor(1.0, dtype=DTYPE)),
                               (jac / (curv.diagonal + 1)) @ jac.transpose(1, 2))


@pytest.mark.parametrize("model_kind", ["mlp", "cnn", "last_layer"])
@pytest.mark.parametrize("prior_kind", ["scalar", "layer", "parameter"])
def test_diag_posterior_equals_dense(classification_data, image_data, model_kind, prior_kind):
    if model_kind == "cnn":
        x, y = image_data
        subset = ParameterSubset(small_cnn(), "all")
    else:
        x, y = classification_data
        subset = ParameterSubset(small_mlp(), "last_layer" if model_kind == "last_layer" else "all")
    curv = _fit(subset, x, y, "classification")
    prior, scale = random_priors(subset)[prior_kind], torch.tensor(2.3, dtype=DTYPE)
    precision = curv.dense_precision(prior, scale)
    torch.testing.assert_close(precision, torch.diag(torch.diagonal(precision)))
    cov = torch.linalg.inv(precision)
    inputs = subset.inputs(x[:9])
    jac = dense_jacobians(subset, inputs)
    torch.testing.assert_close(curv.functional_covariance(inputs, prior, scale), jac @ cov @ jac.transpose(1, 2),
                               rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(curv.logdet_precision(prior, scale), torch.logdet(precision), rtol=1e-6, atol=0)
    torch.testing.assert_close(curv.posterior_variance(prior, scale), torch.diagonal(cov), rtol=1e-6, atol=0)
    with torch.no_grad():  # the predictive runs under no_grad
        torch.testing.assert_close(curv.functional_covariance(inputs, prior, scale), jac @ cov @ jac.transpose(1, 2),
                                   rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("prior_kind", ["scalar", "layer", "parameter"])
def test_diag_logdet_gradient_matches_finite_differences(classification_data, prior_kind):
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    curv = _fit(subset, x, y, "classification")
    check_logdet_gradient(curv, random_priors(subset)[prior_kind])


def test_diag_sample_covariance(classification_data):
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    curv = _fit(subset, x, y, "classification")
    prior, scale = random_priors(subset)["parameter"], torch.tensor(1.7, dtype=DTYPE)
    n = 40_000
    draws = curv.sample(n, prior, scale, torch.Generator().manual_seed(0))
    assert draws.shape == (n, subset.n_params)
    var = curv.posterior_variance(prior, scale)
    # sample variance of a Gaussian has relative std sqrt(2/n) = 0.007; 6 of those over 68 entries
    assert float(((draws.square().mean(0) - var) / var).abs().max()) < 6 * (2 / n) ** 0.5
    # off-diagonal sample correlations have std 1/sqrt(n) = 0.005
    corr = torch.corrcoef(draws[:, :10].T) - torch.eye(10, dtype=DTYPE)
    assert float(corr.abs().max()) < 6 / n**0.5


def test_diag_state_dict_round_trip(classification_data):
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    curv = _fit(subset, x, y, "classification", chunk_bytes=12345)
    loaded = DiagCurvature.from_state_dict(subset, curv.state_dict())
    prior, scale = torch.tensor([0.5], dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE)
    assert torch.equal(loaded.diagonal, curv.diagonal) and loaded.chunk_bytes == 12345
    assert torch.equal(loaded.functional_covariance(x, prior, scale), curv.functional_covariance(x, prior, scale))


def test_diag_bad_options(classification_data):
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    with pytest.raises(TypeError, match="chunk_bytes"):
        _fit(subset, x, y, "classification", rank=3)
    with pytest.raises(FloatingPointError):
        def bad():
            yield x, y
        model = small_mlp()
        with torch.no_grad():
            model[0].weight.fill_(float("nan"))
        sub = ParameterSubset(model, "all")
        DiagCurvature.fit(sub, bad, OutputFactors("classification"), progress=False)
