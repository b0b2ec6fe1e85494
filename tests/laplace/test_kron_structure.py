"""KFAC factors and the Kronecker structure against dense references and curvlinops (float64)."""

import pytest
import torch
from references import DTYPE, dense_ggn, dense_jacobians, minibatches, small_cnn, small_mlp
from torch import nn

from posthoc.curvature.kfac import KFACApproximation, kfac_factors
from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.structures.ekfac import EKFACCurvature
from posthoc.laplace.structures.kron import KronCurvature
from posthoc.network.subset import ParameterSubset

STRUCTURES = [KronCurvature, EKFACCurvature]


def _fit(cls, subset, x, y, likelihood, **options):
    return cls.fit(subset, minibatches(subset, x, y, batch=4), OutputFactors(likelihood), progress=False, **options)


def cnn_with_norms() -> nn.Module:
    """Conv(bias) - BatchNorm2d - ReLU - MaxPool - Conv(no bias) - Tanh - Flatten - LayerNorm - Linear, in eval mode.

    BatchNorm and LayerNorm parameters exercise the diagonal fallback.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(2, 3, 2, bias=False), nn.Tanh(), nn.Flatten(), nn.LayerNorm(12),
                          nn.Linear(12, 3)).to(DTYPE)
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        for norm in (model[1], model[7]):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _scalar(value):
    return torch.tensor([value], dtype=DTYPE)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("subset_kind", ["all", "last_layer"])
def test_one_example_equals_exact_ggn_blocks(classification_data, regression_data, likelihood, subset_kind):
    x, y = classification_data if likelihood == "classification" else regression_data
    x, y = x[:1], y[:1]
    subset = ParameterSubset(small_mlp(n_out=3 if likelihood == "classification" else 1), subset_kind)
    curv = _fit(KronCurvature, subset, x, y, likelihood)
    kron = curv.dense_precision(_scalar(1.0), torch.tensor(1.0, dtype=DTYPE)) - torch.eye(subset.n_params, dtype=DTYPE)
    exact = dense_ggn(subset, subset.inputs(x), likelihood)
    for block in subset.blocks:
        torch.testing.assert_close(kron[block.slice, block.slice], exact[block.slice, block.slice],
                                   rtol=0, atol=1e-10)


def _curvlinops_factors(model, loss, x, y, approx):
    curvlinops = pytest.importorskip(
        "curvlinops", reason="curvlinops not installed (pip install --no-deps curvlinops-for-pytorch==3.0.1 "
                             "einops einconv linear_operator)")
    data = [(x[i:i + 4], y[i:i + 4]) for i in range(0, len(x), 4)]
    op = curvlinops.KFACLinearOperator(model, loss, list(model.parameters()), data, fisher_type="type-2",
                                       kfac_approx=approx, check_deterministic=False, num_data=len(x))
    op.compute_kronecker_factors()
    state = op.state_dict()
    return state["input_covariances"], state["gradient_covariances"]


def _sequence_model() -> nn.Module:
    """A Linear shared over 5 positions of a (B, 5, 3) input, then Flatten - Linear."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)).to(DTYPE)


def _wide_cnn() -> nn.Module:
    """Convolutions wide enough (C_in·kw >= MIN_ROW_WIDTH) for the row-lag route of the input factor."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1, stride=2),
                         nn.Tanh(), nn.Conv2d(8, 2, (3, 2), padding=(0, 1), dilation=(1, 2)), nn.Flatten(),
                         nn.Linear(6, 3)).to(DTYPE)


@pytest.mark.parametrize("approx", list(KFACApproximation))
@pytest.mark.parametrize("case", ["mlp", "regression", "cnn", "wide_cnn", "sequence"])
def test_factors_match_curvlinops(classification_data, regression_data, image_data, approx, case):
    """A equals curvlinops' for any reduction; G for CrossEntropyLoss(sum), and half of MSELoss(sum)'s."""
    if case == "mlp":
        (x, y), model, likelihood = classification_data, small_mlp(), "classification"
    elif case == "regression":
        model, likelihood = small_mlp(n_out=2), "regression"
        x = regression_data[0]
        y = torch.cat([regression_data[1], regression_data[1] ** 2], dim=1)
    elif case == "cnn":
        (x, y), model, likelihood = image_data, small_cnn(), "classification"
    elif case == "wide_cnn":
        (x, y), model, likelihood = image_data, _wide_cnn(), "classification"
    else:
        model, likelihood = _sequence_model(), "classification"
        x = torch.randn(10, 5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
        y = classification_data[1][:10]
    loss = nn.CrossEntropyLoss(reduction="sum") if likelihood == "classification" else nn.MSELoss(reduction="sum")
    theirs_a, theirs_g = _curvlinops_factors(model, loss, x, y, approx.value)
    subset = ParameterSubset(model, "all")
    ours = kfac_factors(subset, minibatches(subset, x, y, batch=4)(), OutputFactors(likelihood), approx, progress=False)
    g_scale = 2.0 if likelihood == "regression" else 1.0
    assert {layer.name for layer in ours.layers} == set(theirs_g)
    assert not ours.fallback
    for layer in ours.layers:
        torch.testing.assert_close(ours.input_factors[layer.name], theirs_a[layer.name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_scale * ours.output_factors[layer.name], theirs_g[layer.name],
                                   rtol=1e-10, atol=1e-12)


def _problem(name, classification_data, regression_data, image_data):
    """(subset, x, y, likelihood, scale, test inputs)."""
    if name == "mlp":
        x, y = classification_data
        return ParameterSubset(small_mlp(), "all"), x, y, "classification", 1.0, x[:6]
    if name == "regression":
        x, y = regression_data
        return ParameterSubset(small_mlp(n_out=1), "all"), x, y, "regression", 0.3 ** -2, x[:6]
    if name == "last_layer":
        x, y = classification_data
        return ParameterSubset(small_mlp(), "last_layer"), x, y, "classification", 1.0, x[:6]
    if name == "sequence":
        x = torch.randn(12, 5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
        return ParameterSubset(_sequence_model(), "all"), x, classification_data[1][:12], "classification", 1.0, x[:4]
    x, y = image_data
    model = small_cnn() if name == "cnn" else cnn_with_norms()
    return ParameterSubset(model, "all"), x, y, "classification", 1.0, x[:5]


def _priors(subset):
    n = len(subset.blocks)
    return [_scalar(0.7), torch.linspace(0.2, 3.0, n, dtype=DTYPE)]


PROBLEMS = ["mlp", "regression", "last_layer", "sequence", "cnn", "cnn_norms"]


@pytest.mark.parametrize("cls", STRUCTURES)
@pytest.mark.parametrize("problem", PROBLEMS)
def test_functional_covariance_logdet_variance_match_dense(classification_data, regression_data, image_data,
                                                           cls, problem):
    subset, x, y, likelihood, scale, x_test = _problem(problem, classification_data, regression_data, image_data)
    curv = _fit(cls, subset, x, y, likelihood)
    scale = torch.tensor(scale, dtype=DTYPE)
    jac = dense_jacobians(subset, subset.inputs(x_test))
    for prior in _priors(subset):
        precision = curv.dense_precision(prior, scale)
        torch.testing.assert_close(precision, precision.T)
        inverse = torch.linalg.inv(precision)
        expected = jac @ inverse @ jac.transpose(1, 2)
        got = curv.functional_covariance(subset.inputs(x_test), prior, scale)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
        torch.testing.assert_close(curv.logdet_precision(prior, scale), torch.logdet(precision), rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(curv.posterior_variance(prior, scale), torch.diagonal(inverse),
                                   rtol=1e-8, atol=1e-12)


def test_fallback_blocks_are_the_exact_diagonal(image_data):
    x, y = image_data
    subset = ParameterSubset(cnn_with_norms(), "all")
    curv = _fit(KronCurvature, subset, x, y, "classification")
    names = [subset.blocks[i].name for i in curv.fallback]
    assert names == ["1.weight", "1.bias", "7.weight", "7.bias"]
    exact = torch.diagonal(dense_ggn(subset, x, "classification"))
    positions = torch.cat([torch.arange(subset.blocks[i].offset, subset.blocks[i].offset + subset.blocks[i].numel)
                           for i in curv.fallback])
    torch.testing.assert_close(curv.fallback_diag, exact[positions], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", STRUCTURES)
def test_logdet_is_differentiable(image_data, cls):
    x, y = image_data
    subset = ParameterSubset(cnn_with_norms(), "all")
    curv = _fit(cls, subset, x, y, "classification")
    prior = torch.linspace(0.5, 2.0, len(subset.blocks), dtype=DTYPE).requires_grad_(True)
    scale = torch.tensor(1.7, dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(curv.logdet_precision, (prior, scale))
    grads = torch.autograd.grad(curv.logdet_precision(prior, scale), (prior, scale))
    dense_grads = torch.autograd.grad(torch.logdet(curv.dense_precision(prior, scale)), (prior, scale))
    for ours, ref in zip(grads, dense_grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("cls", STRUCTURES)
def test_sample_covariance_matches_inverse_precision(image_data, cls):
    x, y = image_data
    subset = ParameterSubset(cnn_with_norms(), "all")
    curv = _fit(cls, subset, x, y, "classification")
    prior, scale = torch.linspace(0.5, 2.0, len(subset.blocks), dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE)
    n = 40_000
    samples = curv.sample(n, prior, scale, torch.Generator().manual_seed(0))
    assert samples.shape == (n, subset.n_params)
    cov = torch.linalg.inv(curv.dense_precision(prior, scale))
    estimate = samples.T @ samples / n  # the mean is known to be 0
    # Var of a Gaussian sample covariance entry is (S_ii S_jj + S_ij^2) / n; with ~8k entries a 5-sigma
    # bound is exceeded by chance with probability < 1e-2 (union bound), and the seed is fixed.
    sd = torch.sqrt((torch.outer(cov.diagonal(), cov.diagonal()) + cov ** 2) / n)
    assert float(((estimate - cov).abs() / sd).max()) < 5.0


@pytest.mark.parametrize("cls", STRUCTURES)
def test_state_dict_round_trip(image_data, cls):
    x, y = image_data
    subset = ParameterSubset(cnn_with_norms(), "all")
    curv = _fit(cls, subset, x, y, "classification", kfac_approx="reduce")
    restored = cls.from_state_dict(subset, curv.state_dict())
    prior, scale = _scalar(0.9), torch.tensor(1.0, dtype=DTYPE)
    assert torch.equal(restored.functional_covariance(x[:3], prior, scale),
                       curv.functional_covariance(x[:3], prior, scale))
    assert torch.equal(restored.logdet_precision(prior, scale), curv.logdet_precision(prior, scale))
    assert restored.approximation is KFACApproximation.REDUCE


@pytest.mark.parametrize("cls", STRUCTURES)
def test_bad_prior_subset_and_options(classification_data, cls):
    x, y = classification_data
    model = small_mlp()
    subset = ParameterSubset(model, "all")
    curv = _fit(cls, subset, x, y, "classification")
    per_parameter = torch.ones(subset.n_params, dtype=DTYPE)
    with pytest.raises(ValueError, match="per-parameter"):
        curv.logdet_precision(per_parameter, torch.tensor(1.0, dtype=DTYPE))
    with pytest.raises(ValueError, match="per-parameter"):
        curv.functional_covariance(x[:2], per_parameter, torch.tensor(1.0, dtype=DTYPE))
    assert not cls.supports_subnetwork
    sub = ParameterSubset(model, "subnetwork", subnetwork_indices=torch.tensor([0, 3, 9]))
    with pytest.raises(ValueError, match="subnetwork"):
        _fit(cls, sub, x, y, "classification")
    with pytest.raises(TypeError, match="kfac_approx"):
        _fit(cls, subset, x, y, "classification", rank=3)
    with pytest.raises(ValueError, match="kfac_approx"):
        _fit(cls, subset, x, y, "classification", kfac_approx="sideways")
    with pytest.raises(ValueError, match="empty"):
        cls.fit(subset, lambda: iter([]), OutputFactors("classification"), progress=False)


def test_reused_layer_falls_back_to_diagonal(classification_data):
    """A Linear called twice per forward cannot be Kronecker-factored per call: it goes to the diagonal."""
    x, y = classification_data

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.inner = nn.Linear(3, 3).to(DTYPE)
            self.out = nn.Linear(3, 3).to(DTYPE)

        def forward(self, z):
            return self.out(torch.tanh(self.inner(torch.tanh(self.inner(z)))))

    subset = ParameterSubset(Twice(), "all")
    curv = _fit(KronCurvature, subset, x, y, "classification")
    assert [layer.name for layer in curv.layers] == ["out"]
    assert [subset.blocks[i].name for i in curv.fallback] == ["inner.weight", "inner.bias"]
    prior, scale = _scalar(1.0), torch.tensor(1.0, dtype=DTYPE)
    jac = dense_jacobians(subset, x[:4])
    expected = jac @ torch.linalg.inv(curv.dense_precision(prior, scale)) @ jac.transpose(1, 2)
    torch.testing.assert_close(curv.functional_covariance(x[:4], prior, scale), expected, rtol=1e-6, atol=1e-12)
