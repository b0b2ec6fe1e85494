"""Laplace with independent Bernoulli outputs (likelihood "binary"): one logit (K = 1) and multi-label (K = 3).

Every number is checked in float64 against a dense reference built here: per-example Jacobians by
torch.func.jacrev over the flat parameters, Gamma_n = diag(p_n (1 - p_n)), H = sum_n J_n^T Gamma_n J_n, the glm
covariance J Lambda^-1 J^T, and E[sigmoid(f)] by Gauss-Hermite quadrature.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from references import model_jacobians
from torch import nn

from posthoc import Laplace
from posthoc.likelihood import Likelihood, from_problem_type
from posthoc.metrics import multilabel_nll
from posthoc.predictive.bernoulli import BernoulliPredictive, sigmoid_probit

DTYPE = torch.float64


def make_model(n_out: int) -> nn.Module:
    torch.manual_seed(n_out)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, n_out)).to(DTYPE)


def make_data(n_out: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + n_out)
    x = torch.randn(n, 3, generator=g, dtype=DTYPE)
    y = (torch.rand(n, n_out, generator=g, dtype=DTYPE) < 0.5).to(DTYPE)
    return x, y


def loader(x: torch.Tensor, y: torch.Tensor, batch: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


def reference_ggn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    jac = model_jacobians(model, x)
    with torch.no_grad():
        p = torch.sigmoid(model(x))
    return torch.einsum("bkp,bk,bkq->pq", jac, p * (1 - p), jac)


def expected_sigmoid(mean: torch.Tensor, var: torch.Tensor, nodes: int = 200) -> torch.Tensor:
    """E[sigmoid(f)], f ~ N(mean, var) elementwise, by Gauss-Hermite quadrature (probabilists')."""
    nodes_np, weights_np = np.polynomial.hermite_e.hermegauss(nodes)
    t = torch.tensor(nodes_np, dtype=DTYPE)
    w = torch.tensor(weights_np, dtype=DTYPE) / math.sqrt(2 * math.pi)
    return (torch.sigmoid(mean.unsqueeze(-1) + var.sqrt().unsqueeze(-1) * t) * w).sum(-1)


@pytest.mark.parametrize("n_out", [1, 3])
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_ggn_and_glm_covariance_match_dense_reference(n_out, structure):
    model, (x, y) = make_model(n_out), make_data(n_out)
    prior = 0.7
    la = Laplace(model, "binary", "all", structure, prior_precision=prior, progress=False).fit(loader(x, y))
    assert la.n_data == len(x) and la.n_outputs == n_out
    ggn = reference_ggn(model, x)
    if structure == "full":
        torch.testing.assert_close(la.structure.hessian, ggn, rtol=1e-10, atol=1e-12)
        posterior = torch.linalg.inv(ggn + prior * torch.eye(len(ggn), dtype=DTYPE))
    else:
        torch.testing.assert_close(la.structure.diagonal, torch.diagonal(ggn), rtol=1e-10, atol=1e-12)
        posterior = torch.diag(1 / (torch.diagonal(ggn) + prior))
    x_test = x[:4]
    jac = model_jacobians(model, x_test)
    pred = la.predict(x_test)
    assert isinstance(pred, BernoulliPredictive)
    torch.testing.assert_close(pred.mean, model(x_test).detach())
    torch.testing.assert_close(pred.cov, torch.einsum("bkp,pq,blq->bkl", jac, posterior, jac), rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("n_out", [1, 3])
def test_last_layer_kron_matches_the_kfac_formula(n_out):
    """KFAC of the head: G = sum_n diag(p_n (1 - p_n)), A = mean_n a_n a_n^T; bias block G."""
    model, (x, y) = make_model(n_out), make_data(n_out)
    la = Laplace(model, "binary", "last_layer", "kron", progress=False).fit(loader(x, y))
    with torch.no_grad():
        a = torch.tanh(model[0](x))
        p = torch.sigmoid(model(x))
    g = torch.diag((p * (1 - p)).sum(0))
    expected = torch.block_diag(torch.kron(g, a.T @ a / len(x)), g)
    one = torch.ones(1, dtype=DTYPE)
    precision = la.structure.dense_precision(one, torch.ones((), dtype=DTYPE))
    torch.testing.assert_close(precision - torch.eye(len(precision), dtype=DTYPE), expected, rtol=1e-9, atol=1e-12)


def test_single_logit_accepts_vector_targets_of_any_dtype():
    model, (x, y) = make_model(1), make_data(1)
    reference = Laplace(model, "binary", "all", "full", progress=False).fit(loader(x, y))
    for targets in (y[:, 0], y[:, 0].long(), y[:, 0].bool(), y.long()):
        la = Laplace(model, "binary", "all", "full", progress=False).fit(loader(x, targets))
        torch.testing.assert_close(la.structure.hessian, reference.structure.hessian)
        torch.testing.assert_close(la.log_marginal_likelihood(), reference.log_marginal_likelihood())


@pytest.mark.parametrize("n_out", [1, 3])
def test_evidence_data_term_is_minus_the_summed_bce(n_out):
    model, (x, y) = make_model(n_out), make_data(n_out)
    la = Laplace(model, "binary", "all", "diag", prior_precision=0.5, progress=False).fit(loader(x, y))
    with torch.no_grad():
        data_term = -nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="sum")
    torch.testing.assert_close(la.log_likelihood, data_term)
    theta, delta = la.subset.theta_map, la.prior_precision
    logdet = torch.log(la.structure.diagonal + delta).sum()
    by_hand = data_term - 0.5 * (delta * theta**2).sum() + 0.5 * len(theta) * torch.log(delta) - 0.5 * logdet
    torch.testing.assert_close(la.log_marginal_likelihood(), by_hand.reshape(()))


def test_probit_link_is_mackay_and_close_to_quadrature():
    model, (x, y) = make_model(3), make_data(3)
    la = Laplace(model, "binary", "all", "full", prior_precision=0.05, progress=False).fit(loader(x, y))
    pred = la.predict(x[:5])
    mackay = torch.sigmoid(pred.mean / torch.sqrt(1 + math.pi * pred.var / 8))
    torch.testing.assert_close(la(x[:5]), mackay)  # la(x)'s default link for binary: "probit"
    torch.testing.assert_close(pred.probs(), mackay)
    assert float(pred.var.min()) > 0.1  # a wide posterior, so the link differs from sigmoid(mean)
    assert float((mackay - torch.sigmoid(pred.mean)).abs().max()) > 0.01
    # MacKay's approximation: absolute error below 0.03 for any mean and variance (docs: 0.028 on a wide grid)
    torch.testing.assert_close(mackay, expected_sigmoid(pred.mean, pred.var), rtol=0, atol=0.03)
    mean = torch.linspace(-10, 10, 41, dtype=DTYPE)[:, None]
    var = torch.logspace(-3, 3, 25, dtype=DTYPE)[None, :]
    error = (sigmoid_probit(mean.expand(41, 25), var.expand(41, 25)) - expected_sigmoid(mean, var)).abs()
    assert float(error.max()) < 0.03
    torch.testing.assert_close(sigmoid_probit(mean, torch.zeros_like(mean)), torch.sigmoid(mean))  # exact at v = 0


def test_mc_link_matches_quadrature():
    model, (x, y) = make_model(3), make_data(3)
    la = Laplace(model, "binary", "all", "full", prior_precision=0.05, progress=False).fit(loader(x, y))
    pred = la.predict(x[:5])
    exact = expected_sigmoid(pred.mean, pred.var)
    # 20,000 draws of a quantity in [0, 1]: standard error <= 0.0035
    torch.testing.assert_close(la(x[:5], link_approx="mc", n_samples=20_000), exact, rtol=0, atol=0.015)
    torch.testing.assert_close(pred.probs("mc", n_samples=20_000, seed=1), exact, rtol=0, atol=0.015)


def test_nn_predictive_averages_sigmoid_over_weight_samples():
    model, (x, y) = make_model(3), make_data(3)
    la = Laplace(model, "binary", "all", "diag", progress=False).fit(loader(x, y))
    pred = la.predict(x[:4], pred_type="nn", n_samples=30, seed=0)
    thetas = la.sample(30, seed=0)
    samples = torch.stack([la.subset.forward(x[:4], theta) for theta in thetas]).detach()
    torch.testing.assert_close(pred.probs(), torch.sigmoid(samples).mean(0))
    probs = la(x[:4], pred_type="nn", link_approx="mc", n_samples=30)
    assert probs.shape == (4, 3) and bool(((probs > 0) & (probs < 1)).all())


def test_softmax_links_are_refused():
    model, (x, y) = make_model(3), make_data(3)
    la = Laplace(model, "binary", "all", "diag", progress=False).fit(loader(x, y))
    for link in ("probit_centred", "bridge", "bridge_norm"):
        with pytest.raises(ValueError, match="softmax link"):
            la(x[:2], link_approx=link)
    with pytest.raises(ValueError, match="softmax link"):
        la.predict(x[:2]).probs("bridge")
    with pytest.raises(TypeError, match="no observation noise"):
        la.predict(x[:2]).with_noise(1.0)
    with pytest.raises(ValueError, match="leave it at 1"):
        la.sigma_noise = 2.0


def test_gridsearch_picks_the_lowest_validation_bce():
    model, (x, y) = make_model(3), make_data(3, n=24)
    train, val = loader(x[:16], y[:16]), loader(x[16:], y[16:])
    la = Laplace(model, "binary", "all", "full", progress=False).fit(train)
    grid = torch.logspace(-2, 2, 5, dtype=DTYPE)
    losses = []
    for delta in grid:
        la.prior_precision = delta
        losses.append(multilabel_nll(la(x[16:]), y[16:]))
    chosen = la.optimize_prior_precision(method="gridsearch", val_loader=val, grid=grid)
    assert float(chosen) == float(grid[int(np.argmin(losses))])
    assert len(set(np.round(losses, 8))) > 1  # the grid values are told apart


def test_marglik_increases_the_evidence():
    model, (x, y) = make_model(3), make_data(3)
    la = Laplace(model, "binary", "all", "kron", prior_precision=100.0, progress=False).fit(loader(x, y))
    before = float(la.log_marginal_likelihood())
    la.optimize_prior_precision(method="marglik", n_steps=30)
    assert float(la.log_marginal_likelihood()) > before


@pytest.mark.parametrize(("targets", "message"), [
    (lambda y: 2 * y, "must be 0 or 1"),
    (lambda y: 0.5 * y, "must be 0 or 1"),
    (lambda y: y.masked_fill(y == 1, float("nan")), "must be 0 or 1"),
    (lambda y: y[:, :2], "do not match the model's 3 output"),
    (lambda y: y[:, 0], "do not match the model's 3 output"),
    (lambda y: y.unsqueeze(-1), r"must be \(B, K\)"),
])
def test_bad_targets_are_clear_errors(targets, message):
    model, (x, y) = make_model(3), make_data(3)
    with pytest.raises(ValueError, match=message):
        Laplace(model, "binary", "all", "diag", progress=False).fit(loader(x, targets(y)))


def test_class_index_targets_of_a_single_logit_model_outside_01_are_refused():
    model, (x, _) = make_model(1), make_data(1)
    with pytest.raises(ValueError, match="must be 0 or 1"):
        Laplace(model, "binary", "all", "diag", progress=False).fit(loader(x, torch.arange(len(x)) % 3))


def test_problem_type_maps_only_when_asked():
    assert from_problem_type("multi_label_classification") is Likelihood.BINARY
    assert from_problem_type("single_label_classification") is Likelihood.CLASSIFICATION
    assert from_problem_type("regression") is Likelihood.REGRESSION
    with pytest.raises(ValueError, match="unknown problem_type"):
        from_problem_type(None)


def test_predict_loader_joins_bernoulli_predictives():
    from posthoc.predictive import predict_loader

    model, (x, y) = make_model(3), make_data(3)
    la = Laplace(model, "binary", "all", "diag", progress=False).fit(loader(x, y))
    joined, targets = predict_loader(la.predict, loader(x, y))
    assert isinstance(joined, BernoulliPredictive)
    torch.testing.assert_close(joined.probs(), la.predict(x).probs())
    torch.testing.assert_close(targets, y)


def test_empirical_fisher_matches_dense_reference():
    model, (x, y) = make_model(3), make_data(3)
    la = Laplace(model, "binary", "all", "full", curvature="ef", progress=False).fit(loader(x, y))
    jac = model_jacobians(model, x)
    with torch.no_grad():
        residual = torch.sigmoid(model(x)) - y  # the gradient of BCE-with-logits in f
    gradients = torch.einsum("bkp,bk->bp", jac, residual)
    torch.testing.assert_close(la.structure.hessian, gradients.T @ gradients, rtol=1e-10, atol=1e-12)
