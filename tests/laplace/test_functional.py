"""FunctionalLaplace (the GP form on a data subset) against exact_lla and dense float64 weight-space references."""

import math

import numpy as np
import pytest
import torch
from references import dense_jacobians, mlp_data, output_hessians, small_mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from posthoc.laplace.function_space import exact_lla
from posthoc.laplace.functional import FunctionalLaplace
from posthoc.laplace.laplace import Laplace
from posthoc.network.subset import ParameterSubset

DTYPE = torch.float64


def _fit(likelihood, n_subset, model=None, **kwargs):
    x, y = mlp_data(likelihood, 20)
    model = small_mlp().to(DTYPE) if model is None else model
    la = FunctionalLaplace(model, likelihood, n_subset, **kwargs)
    return la.fit(DataLoader(TensorDataset(x, y), batch_size=6)), x, y


def _weight_space_cov(la, x_sub, x_test, diag_hessian, output=None):
    """J* (delta N / M I + J_M^T Lambda J_M)^-1 J*^T from dense Jacobians (one output's if ``output``)."""
    subset = ParameterSubset(la.model, "all")
    jac_m, jac_s = dense_jacobians(subset, x_sub), dense_jacobians(subset, x_test)
    with torch.no_grad():
        lam = output_hessians(subset.forward(x_sub), la.likelihood.value) / float(la.sigma_noise) ** 2
    if diag_hessian:
        lam = torch.diag_embed(lam.diagonal(dim1=-2, dim2=-1))
    if output is not None:
        jac_m, jac_s, lam = jac_m[:, output:output + 1], jac_s[:, output:output + 1], lam[:, output:output + 1,
                                                                                          output:output + 1]
    delta = float(la.prior_precision) * la.n_data / la.n_subset
    precision = delta * torch.eye(jac_m.shape[-1], dtype=DTYPE) + torch.einsum("mcp,mcd,mdq->pq", jac_m, lam, jac_m)
    return torch.einsum("bcp,pq,bdq->bcd", jac_s, torch.linalg.inv(precision), jac_s)


def test_regression_on_the_whole_data_is_the_exact_lla():
    la, x, _ = _fit("regression", 20, prior_precision=0.7, sigma_noise=0.4)
    x_test = torch.randn(5, 3, dtype=DTYPE)
    f_mu, f_var = la(x_test)
    ref = exact_lla(ParameterSubset(la.model, "all"), x, x_test, "regression", 0.7, sigma_noise=0.4)
    torch.testing.assert_close(f_mu, ref.mean)
    torch.testing.assert_close(f_var, ref.cov)
    weight_space = Laplace(la.model, "regression", "all", "full", prior_precision=0.7, sigma_noise=0.4,
                           progress=False).fit(DataLoader(TensorDataset(x, mlp_data("regression", 20)[1]), batch_size=6))
    torch.testing.assert_close(f_var, weight_space.predict(x_test).cov)
    mean, joint = la(x_test, joint=True)
    torch.testing.assert_close(joint.reshape(5, 3, 5, 3).diagonal(dim1=0, dim2=2).permute(2, 0, 1), f_var)


def test_classification_full_output_hessian_on_the_whole_data_is_the_exact_lla():
    la, x, _ = _fit("classification", 20, prior_precision=1.3, output_hessian="full")
    x_test = torch.randn(5, 3, dtype=DTYPE)
    ref = exact_lla(ParameterSubset(la.model, "all"), x, x_test, "classification", 1.3)
    torch.testing.assert_close(la.predict(x_test).cov, ref.cov)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_subset_predictive_is_the_weight_space_posterior_of_the_subset(likelihood):
    la, x, _ = _fit(likelihood, 8, prior_precision=0.9, seed=3)
    expected = np.random.default_rng(3).choice(20, 8, replace=False)
    assert la.indices.tolist() == expected.tolist()  # laplace-torch's SoDSampler draw
    x_test = torch.randn(4, 3, dtype=DTYPE)
    ref = _weight_space_cov(la, x[la.indices], x_test, diag_hessian=True)
    torch.testing.assert_close(la.predict(x_test).cov, ref)
    if likelihood == "classification":  # the diagonal output Hessian differs from the exact one
        exact = _weight_space_cov(la, x[la.indices], x_test, diag_hessian=False)
        assert not torch.allclose(ref, exact, rtol=1e-3, atol=1e-6)


def test_independent_outputs_is_one_gp_per_output():
    la, x, _ = _fit("classification", 10, prior_precision=0.5, independent_outputs=True)
    x_test = torch.randn(4, 3, dtype=DTYPE)
    cov = la.predict(x_test).cov
    for c in range(3):
        ref = _weight_space_cov(la, x[la.indices], x_test, diag_hessian=True, output=c)
        torch.testing.assert_close(cov[:, c, c], ref[:, 0, 0])
    assert float(cov[:, 0, 1].abs().max()) == 0.0


def test_regression_evidence_terms_are_the_linear_gaussian_evidence():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DTYPE)  # linear in theta: the Laplace evidence is exact
    x, y = mlp_data("regression", 20)
    y = y[:, :2]
    design = torch.cat([x, torch.ones(20, 1, dtype=DTYPE)], 1)  # the ridge MAP: theta* is the exact posterior mean
    weights = torch.linalg.solve(design.T @ design / 0.25 + 0.6 * torch.eye(4, dtype=DTYPE), design.T @ y / 0.25)
    with torch.no_grad():
        model.weight.copy_(weights[:3].T)
        model.bias.copy_(weights[3])
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    la = FunctionalLaplace(model, "regression", 20, prior_precision=0.6, sigma_noise=0.5).fit(loader)
    exact = Laplace(model, "regression", "all", "full", prior_precision=0.6, sigma_noise=0.5, progress=False)
    exact.fit(loader)
    gp_evidence = -0.5 * (la.scatter + la.log_det_ratio) - 20 * 2 / 2 * math.log(2 * math.pi)
    torch.testing.assert_close(gp_evidence, exact.log_marginal_likelihood())
    with torch.no_grad():
        residual = ((model(x) - y) ** 2).sum()
    torch.testing.assert_close(la.log_likelihood, -residual / (2 * 0.25) - 40 * math.log(0.5 * math.sqrt(2 * math.pi)))
    torch.testing.assert_close(la.log_marginal_likelihood(), la.log_likelihood - 0.5 * (la.log_det_ratio + la.scatter))


def test_classification_log_det_ratio_and_tuning():
    la, x, _ = _fit("classification", 8, prior_precision=0.9)
    subset = ParameterSubset(la.model, "all")
    jac = dense_jacobians(subset, x[la.indices])
    with torch.no_grad():
        lam = output_hessians(subset.forward(x[la.indices]), "classification").diagonal(dim1=-2, dim2=-1)
    delta = 0.9 * 20 / 8
    ggn = torch.einsum("mcp,mc,mcq->pq", jac, lam, jac)
    n_params = jac.shape[-1]
    ref = torch.logdet(delta * torch.eye(n_params, dtype=DTYPE) + ggn) - n_params * math.log(delta)  # Sylvester
    torch.testing.assert_close(la.log_det_ratio, ref)
    log_prior = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    la.log_marginal_likelihood(log_prior.exp()).backward()
    assert log_prior.grad is not None and torch.isfinite(log_prior.grad)
    tuned = la.optimize_prior_precision(n_steps=30)
    assert float(la.log_marginal_likelihood(tuned)) >= float(la.log_marginal_likelihood(torch.tensor(1.0)))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="isotropic"):
        FunctionalLaplace(small_mlp().to(DTYPE), "regression", 4, prior_precision=torch.ones(2))
    with pytest.raises(ValueError, match="exceeds"):
        _fit("regression", 21)
    la = FunctionalLaplace(small_mlp().to(DTYPE), "regression", 4)
    with pytest.raises(RuntimeError, match="fit"):
        la(torch.zeros(1, 3, dtype=DTYPE))
