"""The Laplace class with the full structure: posterior, glm = exact function-space LLA,
marginal likelihood and its gradient, tuning, sampling, state round trip, bad input."""

import math

import pytest
import torch
from references import dense_ggn, dense_jacobians, small_cnn, small_mlp
from torch.utils.data import DataLoader, TensorDataset

from posthoc import Laplace
from posthoc.laplace import exact_lla

DTYPE = torch.float64


def _loader(x, y, batch=8):
    return DataLoader(TensorDataset(x, y), batch_size=batch)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_glm_full_equals_function_space_lla_classification(classification_data, subset):
    x, y = classification_data
    model = small_mlp()
    la = Laplace(model, "classification", subset_of_weights=subset, hessian_structure="full",
                 prior_precision=0.7, progress=False).fit(_loader(x, y))
    x_test = torch.randn(5, 3, generator=torch.Generator().manual_seed(5), dtype=DTYPE) * 2
    pred = la.predict(x_test)
    ref = exact_lla(la.subset, x, x_test, "classification", prior_precision=0.7)
    torch.testing.assert_close(pred.cov, ref.cov, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(pred.mean, ref.mean)


def test_glm_full_equals_function_space_lla_regression(regression_data):
    x, y = regression_data
    la = Laplace(small_mlp(n_out=1), "regression", subset_of_weights="all", hessian_structure="full",
                 prior_precision=torch.full((6,), 2.0), sigma_noise=0.3, progress=False).fit(_loader(x, y))
    x_test = torch.randn(4, 3, dtype=DTYPE)
    ref = exact_lla(la.subset, x, x_test, "regression", prior_precision=2.0, sigma_noise=0.3)
    torch.testing.assert_close(la.predict(x_test).cov, ref.cov, rtol=1e-6, atol=1e-10)


def test_full_posterior_and_marglik_match_dense(classification_data):
    x, y = classification_data
    model = small_mlp()
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="full",
                 prior_precision=0.5, progress=False).fit(_loader(x, y))
    h = dense_ggn(la.subset, x, "classification")
    lam = h + 0.5 * torch.eye(la.n_params, dtype=DTYPE)
    torch.testing.assert_close(la.structure.dense_precision(la.prior_precision, torch.tensor(1.0, dtype=DTYPE)), lam)
    with torch.no_grad():
        loglik = torch.log_softmax(model(x), -1).gather(1, y[:, None]).sum()
    theta = la.subset.theta_map
    expected = loglik - 0.25 * theta @ theta + 0.5 * la.n_params * math.log(0.5) - 0.5 * torch.logdet(lam)
    torch.testing.assert_close(la.log_marginal_likelihood(), expected)
    torch.testing.assert_close(la.posterior_variance(), torch.diagonal(torch.linalg.inv(lam)))


def test_marglik_gradient_matches_finite_differences(regression_data):
    x, y = regression_data
    la = Laplace(small_mlp(n_out=1), "regression", subset_of_weights="all", hessian_structure="full",
                 progress=False).fit(_loader(x, y))
    n_layers = len(la.subset.blocks)
    log_prior = torch.linspace(-1, 1, n_layers, dtype=DTYPE).requires_grad_(True)
    log_sigma = torch.tensor(-0.7, dtype=DTYPE, requires_grad=True)
    value = la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
    g_prior, g_sigma = torch.autograd.grad(value, (log_prior, log_sigma))
    eps = 1e-6
    log_prior, log_sigma = log_prior.detach(), log_sigma.detach()
    for i in range(n_layers):
        step = torch.zeros(n_layers, dtype=DTYPE)
        step[i] = eps
        fd = (la.log_marginal_likelihood((log_prior + step).exp(), log_sigma.exp())
              - la.log_marginal_likelihood((log_prior - step).exp(), log_sigma.exp())) / (2 * eps)
        assert float(fd) == pytest.approx(float(g_prior[i].detach()), rel=1e-6, abs=1e-8)
    fd = (la.log_marginal_likelihood(log_prior.exp(), (log_sigma + eps).exp())
          - la.log_marginal_likelihood(log_prior.exp(), (log_sigma - eps).exp())) / (2 * eps)
    assert float(fd) == pytest.approx(float(g_sigma), rel=1e-6)


def test_marglik_optimisation_increases_evidence(regression_data):
    x, y = regression_data
    la = Laplace(small_mlp(n_out=1), "regression", subset_of_weights="all", hessian_structure="full",
                 prior_precision=1e-3, sigma_noise=3.0, progress=False).fit(_loader(x, y))
    before = float(la.log_marginal_likelihood())
    la.optimize_prior_precision(method="marglik", n_steps=200, lr=0.1)
    after = float(la.log_marginal_likelihood())
    assert after > before + 1.0
    assert 0.01 < float(la.sigma_noise) < 3.0  # the data's noise is 0.1, plus model misfit
    # at the optimum the gradient in log delta (scalar) and log sigma is close to zero
    log_p = la.prior_precision.log().clone().requires_grad_(True)
    log_s = la.sigma_noise.log().clone().requires_grad_(True)
    grads = torch.autograd.grad(la.log_marginal_likelihood(log_p.exp(), log_s.exp()), (log_p, log_s))
    assert all(float(g.abs().max()) < 0.5 for g in grads)


def test_gridsearch_picks_the_lowest_validation_nll(classification_data):
    x, y = classification_data
    la = Laplace(small_mlp(), "classification", subset_of_weights="last_layer", hessian_structure="full",
                 progress=False).fit(_loader(x, y))
    grid = torch.tensor([1e-2, 1.0, 1e2], dtype=DTYPE)
    best = la.optimize_prior_precision(method="gridsearch", val_loader=_loader(x, y), grid=grid)
    nlls = []
    for delta in grid:
        la.prior_precision = delta
        probs = la(x, link_approx="probit")
        nlls.append(float(-torch.log(probs.gather(1, y[:, None])).sum()))
    assert float(best) == float(grid[int(torch.tensor(nlls).argmin())])


def test_sampling_matches_posterior_and_is_seeded(classification_data):
    x, y = classification_data
    la = Laplace(small_mlp(), "classification", subset_of_weights="last_layer", hessian_structure="full",
                 prior_precision=2.0, progress=False).fit(_loader(x, y))
    samples = la.sample(40_000, seed=3)
    cov = torch.linalg.inv(la.structure.dense_precision(la.prior_precision, torch.tensor(1.0, dtype=DTYPE)))
    emp = torch.cov(samples.T)
    # an entry of an n-sample covariance has sd sqrt((S_ii S_jj + S_ij^2) / n) <= sqrt(2 / n) max_var:
    # allow 5 sd (324 entries); the mean has sd sqrt(max_var / n)
    max_var = float(torch.diagonal(cov).max())
    torch.testing.assert_close(emp, cov, atol=5 * math.sqrt(2 / 40_000) * max_var, rtol=0)
    torch.testing.assert_close(samples.mean(0), la.subset.theta_map, atol=5 * math.sqrt(max_var / 40_000), rtol=0)
    torch.testing.assert_close(la.sample(5, seed=1), la.sample(5, seed=1))
    nn_pred = la.predict(x[:4], pred_type="nn", n_samples=30, seed=2)
    assert nn_pred.samples.shape == (30, 4, 3)
    torch.testing.assert_close(nn_pred.samples, la.predict(x[:4], pred_type="nn", n_samples=30, seed=2).samples)


def test_nn_predictive_agrees_with_glm_for_a_linear_last_layer(classification_data):
    # The last layer is linear in its weights, so sampled predictions are exactly Gaussian with the glm covariance.
    x, y = classification_data
    la = Laplace(small_mlp(), "classification", subset_of_weights="last_layer", hessian_structure="full",
                 progress=False).fit(_loader(x, y))
    glm = la.predict(x[:3])
    nn_cov = la.predict(x[:3], pred_type="nn", n_samples=40_000).cov
    torch.testing.assert_close(nn_cov, glm.cov, atol=0.03 * float(glm.cov.abs().max()), rtol=0)


def test_cnn_full(image_data):
    x, y = image_data
    la = Laplace(small_cnn(), "classification", subset_of_weights="all", hessian_structure="full",
                 progress=False).fit(_loader(x, y, 4))
    torch.testing.assert_close(la.structure.hessian, dense_ggn(la.subset, x, "classification"))
    jac = dense_jacobians(la.subset, x[:2])
    lam = la.structure.dense_precision(la.prior_precision, torch.tensor(1.0, dtype=DTYPE))
    torch.testing.assert_close(la.predict(x[:2]).cov, jac @ torch.linalg.solve(lam, jac.transpose(1, 2)))


def test_state_dict_round_trip(classification_data):
    x, y = classification_data
    model = small_mlp()
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="full",
                 prior_precision=0.3, progress=False).fit(_loader(x, y))
    state = la.state_dict()
    other = Laplace(model, "classification", subset_of_weights="all", hessian_structure="full", progress=False)
    other.load_state_dict(state)
    torch.testing.assert_close(other.predict(x).cov, la.predict(x).cov, rtol=0, atol=0)
    assert float(other.log_marginal_likelihood()) == float(la.log_marginal_likelihood())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="weights differ"):
        Laplace(model, "classification", subset_of_weights="all", hessian_structure="full").load_state_dict(state)
    with pytest.raises(ValueError, match="curvature_type='ggn'"):
        Laplace(small_mlp(), "classification", subset_of_weights="all", hessian_structure="full",
                curvature="ef").load_state_dict(state)


def test_dict_batches(classification_data):
    x, y = classification_data
    dict_loader = [{"input": x[:12], "target": y[:12]}, {"input": x[12:], "target": y[12:]}]
    with pytest.warns(DeprecationWarning, match="old meaning"):  # posthoc's old keys: the model gets batch["input"]
        a = Laplace(small_mlp(), "classification", hessian_structure="full", progress=False).fit(dict_loader)
    b = Laplace(small_mlp(), "classification", hessian_structure="full", progress=False).fit(_loader(x, y))
    torch.testing.assert_close(a.structure.hessian, b.structure.hessian)
    c = Laplace(small_mlp(), "classification", hessian_structure="full", progress=False,
                dict_key_x="pixels", dict_key_y="labels")
    with pytest.raises(KeyError, match="dict_key_x"):
        c.fit(dict_loader)


def test_curvature_attribute_is_a_deprecated_name_of_structure(classification_data):
    x, y = classification_data
    la = Laplace(small_mlp(), "classification", hessian_structure="full", progress=False).fit(_loader(x, y))
    with pytest.warns(DeprecationWarning, match="la.structure"):
        assert la.curvature is la.structure


class ValueBranching(torch.nn.Module):
    """A forward pass with Python control flow on tensor values, which vmap over examples cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out * 2.0 if bool((x.abs() < 1e6).all()) else out


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_value_branching_forward_uses_the_per_example_loop(classification_data, structure):
    x, y = classification_data
    model = ValueBranching()
    la = Laplace(model, "classification", "all", structure, progress=False).fit(_loader(x, y))
    assert la.subset.vmap_examples(x) is False
    precision = la.structure.dense_precision(la.prior_precision, torch.tensor(1.0, dtype=DTYPE))
    jac = dense_jacobians(la.subset, x[:5])
    torch.testing.assert_close(la.predict(x[:5]).cov, jac @ torch.linalg.inv(precision) @ jac.transpose(1, 2))
    if structure == "full":  # diag reads Linear layers' signals, no per-example Jacobian in fit
        torch.testing.assert_close(la.structure.hessian, dense_ggn(la.subset, x, "classification"))
        with pytest.raises(RuntimeError, match="vmap"):  # forcing vmap fails inside torch.func, as it did before
            Laplace(model, "classification", "all", structure, progress=False, per_example="vmap").fit(_loader(x, y))


def test_bad_input(classification_data):
    x, y = classification_data
    model = small_mlp()
    with pytest.raises(ValueError, match="'full', 'diag', 'kron', 'ekfac', 'lowrank'"):
        Laplace(model, "classification", hessian_structure="dense")
    with pytest.raises(ValueError, match="'classification', 'regression'"):
        Laplace(model, "poisson")
    with pytest.raises(ValueError, match="'all', 'last_layer', 'subnetwork'"):
        Laplace(model, "classification", subset_of_weights="first_layer", hessian_structure="full")
    with pytest.raises(ValueError, match="> 0"):
        Laplace(model, "classification", hessian_structure="full", prior_precision=0.0)
    with pytest.raises(ValueError, match="1 \\(scalar\\)"):
        Laplace(model, "classification", subset_of_weights="all", hessian_structure="full", prior_precision=torch.ones(7))
    with pytest.raises(ValueError, match="regression"):
        Laplace(model, "classification", hessian_structure="full", sigma_noise=2.0)
    la = Laplace(model, "classification", hessian_structure="full", progress=False)
    with pytest.raises(RuntimeError, match="fit"):
        la.predict(x)
    with pytest.raises(ValueError, match="no batches"):
        la.fit(DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4))
    bad = x.clone()
    bad[2, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        la.fit(_loader(bad, y))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        la.fit(_loader(x, y + 1))
    la.fit(_loader(x, y))
    with pytest.raises(ValueError, match="'glm', 'nn'"):
        la.predict(x, pred_type="linear")
    with pytest.raises(ValueError, match="'probit', 'bridge', 'mc'"):
        la(x, link_approx="softmax")
    with pytest.raises(ValueError, match="'marglik', 'gridsearch'"):
        la.optimize_prior_precision(method="bayes")
    with pytest.raises(ValueError, match="val_loader"):
        la.optimize_prior_precision(method="gridsearch")
    with pytest.raises(ValueError, match="NaN"):
        la.predict(torch.full((2, 3), float("nan"), dtype=DTYPE))


@pytest.mark.parametrize("prior_kind", ["scalar", "layer", "parameter"])
def test_full_structure_prior_kinds_match_dense(classification_data, prior_kind):
    # scalar priors take the eigendecomposition path, the others the Cholesky path
    x, y = classification_data
    model = small_mlp()
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="full",
                 progress=False).fit(_loader(x, y))
    sizes = {"scalar": 1, "layer": len(la.subset.blocks), "parameter": la.n_params}
    la.prior_precision = torch.linspace(0.5, 2.0, sizes[prior_kind], dtype=DTYPE)
    lam = la.structure.dense_precision(la.prior_precision, torch.tensor(1.0, dtype=DTYPE))
    cov = torch.linalg.inv(lam)
    torch.testing.assert_close(la.posterior_variance(), torch.diagonal(cov))
    jac = dense_jacobians(la.subset, la.subset.inputs(x[:5]))
    torch.testing.assert_close(la.predict(x[:5]).cov, jac @ cov @ jac.transpose(1, 2))
    torch.testing.assert_close(la.structure.logdet_precision(la.prior_precision, torch.tensor(1.0, dtype=DTYPE)),
                               torch.logdet(lam))
    samples = la.sample(40_000, seed=0)
    max_var = float(torch.diagonal(cov).max())
    torch.testing.assert_close(torch.cov(samples.T), cov, atol=5 * math.sqrt(2 / 40_000) * max_var, rtol=0)


def test_non_finite_curvature_is_an_error(classification_data):
    x, y = classification_data
    model = small_mlp()
    with torch.no_grad():
        model[-1].weight.fill_(1e308)  # outputs overflow to inf, softmax to NaN
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="full",
                progress=False).fit(_loader(x, y))


@pytest.mark.parametrize("structure, options", [("full", {}), ("diag", {}), ("kron", {}), ("ekfac", {}),
                                                ("lowrank", {"rank": 3, "subsample": 10})])
def test_log_likelihood_and_n_data_for_every_structure(classification_data, structure, options):
    # kron/full/diag record log p(D | theta*) during their pass; ekfac (two passes) and a subsampled
    # low rank (part of the data) take a separate pass: all must give the full-data value
    x, y = classification_data
    model = small_mlp()
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                 structure_options=options, progress=False).fit(_loader(x, y))
    with torch.no_grad():
        expected = torch.log_softmax(model(x), -1).gather(1, y[:, None]).sum()
    assert la.n_data == len(x)
    torch.testing.assert_close(la._loglik_stat, expected)


def test_a_squeezed_output_names_the_squeeze():
    class Squeezed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x).squeeze(-1)

    x, y = torch.randn(20, 2), torch.randn(20)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    with pytest.raises(ValueError, match=r"got \(1,\) for one example.*\.squeeze\(\).*output_fn="):
        Laplace(Squeezed(), "regression", "all", "diag", progress=False).fit(loader)
