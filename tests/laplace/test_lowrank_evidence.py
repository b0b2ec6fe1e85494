"""The evidence of the omitted low-rank posterior (float64, against dense references from torch.autograd).

``complement="omit"`` holds the uncovered directions at theta*: its precision is A = s diag(lam) + U^T D U on
span(U) and unbounded on the complement, so the evidence's log-determinant is log det A (the complement's term
is constant in delta and sigma). ``complement="prior"`` keeps laplace-torch's log det Lambda.
"""

import pytest
import torch
from references import DTYPE, dense_ggn, random_priors, small_mlp
from torch.utils.data import DataLoader, TensorDataset

from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace import Laplace
from posthoc.laplace.prior import per_parameter
from posthoc.laplace.structures.lowrank import LowRankCurvature
from posthoc.network.subset import ParameterSubset


def _top_eigenpairs(hessian, rank):
    values, vectors = torch.linalg.eigh(hessian)
    return vectors[:, -rank:].flip(1), values[-rank:].flip(0)


@pytest.mark.parametrize("complement", ["omit", "prior"])
def test_lowrank_logdet_is_the_limit_of_the_posterior_precision(classification_data, complement):
    """omit: log det(U A U^T + c (I - U U^T)) - (P - k) log c for any c > 0; prior: log det Lambda."""
    x, _ = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    u, lam = _top_eigenpairs(dense_ggn(subset, x, "classification"), 5)
    curv = LowRankCurvature(subset, u, lam, complement=complement)
    scale = torch.tensor(1.3, dtype=DTYPE)
    n_params, rank = subset.n_params, 5
    for prior in random_priors(subset).values():
        delta = per_parameter(prior, subset)
        precision = scale * (u * lam) @ u.T + torch.diag(delta)
        if complement == "prior":
            torch.testing.assert_close(curv.logdet_precision(prior, scale), torch.logdet(precision), rtol=1e-10, atol=0)
            continue
        a = u.T @ precision @ u
        for c in (1.0, 1e3):
            held = u @ a @ u.T + c * (torch.eye(n_params, dtype=DTYPE) - u @ u.T)
            reference = torch.logdet(held) - (n_params - rank) * torch.log(torch.tensor(c, dtype=DTYPE))
            torch.testing.assert_close(curv.logdet_precision(prior, scale), reference, rtol=1e-9, atol=1e-9)
    empty = LowRankCurvature(subset, u[:, :0], lam[:0])  # nothing covered: the posterior is theta*
    assert float(empty.logdet_precision(random_priors(subset)["scalar"], scale)) == 0


def _dense_evidence(model, x, y, u, hessian, delta):
    """log p(D | theta*) - delta |theta*|^2 / 2 + P log(delta) / 2 - log det(U^T (H + delta I) U) / 2."""
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with torch.no_grad():
        loglik = -torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
    a = u.T @ (hessian + delta * torch.eye(len(theta), dtype=DTYPE)) @ u
    return loglik - delta / 2 * theta.square().sum() + len(theta) / 2 * torch.log(delta) - torch.logdet(a) / 2


def test_lowrank_omit_marglik_maximises_the_omitted_posteriors_evidence(classification_data):
    """The Laplace evidence and optimize_prior_precision() (marglik) against the dense float64 formula."""
    x, y = classification_data
    model = small_mlp()
    rank = 4
    la = Laplace(model, "classification", "all", "lowrank", progress=False,
                 structure_options={"rank": rank, "basis": "ggn"})
    la.fit(DataLoader(TensorDataset(x, y), batch_size=7))
    hessian = dense_ggn(la.subset, x, "classification")
    u, lam = _top_eigenpairs(hessian, rank)
    for value in (0.1, 1.0, 10.0):
        delta = torch.tensor(value, dtype=DTYPE)
        torch.testing.assert_close(la.log_marginal_likelihood(delta).detach(),
                                   _dense_evidence(model, x, y, u, hessian, delta), rtol=1e-9, atol=1e-9)
    tuned = la.optimize_prior_precision(method="marglik", n_steps=300)
    # the stationary point: delta = (P - k + sum_i lam_i / (lam_i + delta)) / |theta*|^2
    theta_sq = la.subset.theta_map.square().sum()
    fixed_point = (la.subset.n_params - rank + (lam / (lam + tuned)).sum()) / theta_sq
    torch.testing.assert_close(tuned.reshape(()), fixed_point.reshape(()), rtol=1e-4, atol=0)
    grid = torch.logspace(-3, 3, 601, dtype=DTYPE)
    best = grid[torch.stack([_dense_evidence(model, x, y, u, hessian, d) for d in grid]).argmax()]
    assert abs(float(torch.log(tuned / best))) < 0.012  # within one grid step (10^0.01)
    # the full model's evidence (complement "prior", laplace-torch's) counts the uncovered directions as
    # undetermined and tunes a smaller prior precision on this net
    full = Laplace(model, "classification", "all", "lowrank", progress=False,
                   structure_options={"rank": rank, "basis": "ggn", "complement": "prior"})
    full.fit(DataLoader(TensorDataset(x, y), batch_size=7))
    assert float(full.optimize_prior_precision(method="marglik", n_steps=300)) < 0.5 * float(tuned)


def test_lowrank_omit_evidence_in_sigma_for_regression(regression_data):
    """Regression: the evidence's s = 1 / sigma^2 scales the GGN inside log det A only."""
    x, y = regression_data
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).to(DTYPE)
    rank = 3
    la = Laplace(model, "regression", "all", "lowrank", progress=False,
                 structure_options={"rank": rank, "basis": "ggn"})
    la.fit(DataLoader(TensorDataset(x, y), batch_size=7))
    hessian = dense_ggn(la.subset, x, "regression")
    u, lam = _top_eigenpairs(hessian, rank)
    theta = la.subset.theta_map
    with torch.no_grad():
        residual_sq = (model(x) - y).square().sum()
    for delta, sigma in ((0.5, 0.3), (2.0, 1.1)):
        n = len(y)
        loglik = -n / 2 * torch.log(torch.tensor(2 * torch.pi * sigma**2, dtype=DTYPE)) - residual_sq / (2 * sigma**2)
        a = u.T @ (hessian / sigma**2 + delta * torch.eye(len(theta), dtype=DTYPE)) @ u
        reference = (loglik - delta / 2 * theta.square().sum()
                     + len(theta) / 2 * torch.log(torch.tensor(delta, dtype=DTYPE)) - torch.logdet(a) / 2)
        torch.testing.assert_close(la.log_marginal_likelihood(delta, sigma).detach(), reference, rtol=1e-9, atol=1e-9)


def test_lowrank_omit_evidence_gradient(classification_data):
    """log det A is differentiable in delta (all prior kinds) and s, matching central differences."""
    from references import check_logdet_gradient, minibatches

    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    curv = LowRankCurvature.fit(subset, minibatches(subset, x, y), OutputFactors("classification"), progress=False,
                                rank=4, basis="ggn")
    for prior in random_priors(subset).values():
        check_logdet_gradient(curv, prior)
