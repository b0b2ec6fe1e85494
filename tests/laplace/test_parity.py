"""laplace-torch's names (posthoc.laplace.parity.LaplaceTorchAPI) against dense float64 references on a small MLP."""

import math

import pytest
import torch
from references import dense_ggn, dense_jacobians, small_mlp
from torch.utils.data import DataLoader, TensorDataset

from posthoc.laplace.laplace import Laplace
from posthoc.laplace.parity import LaplaceTorchAPI, bridge_probs
from posthoc.predictive import links

DTYPE = torch.float64


# the mixin on posthoc's Laplace (which inherits it once laplace.py lists it among its bases)
_TestLaplace = Laplace if issubclass(Laplace, LaplaceTorchAPI) else type("_TestLaplace", (LaplaceTorchAPI, Laplace), {})


def _fitted_structure(la):
    """The fitted posterior structure (``la.structure``; ``la.curvature`` before that rename)."""
    attrs = vars(la)
    return attrs["structure"] if "structure" in attrs else attrs["curvature"]


def _fit(x, y, likelihood, structure, prior=0.7, sigma=1.0, n_out=3, **kwargs):
    model = small_mlp(n_out=n_out)
    la = _TestLaplace(model, likelihood, subset_of_weights="all", hessian_structure=structure, prior_precision=prior,
                      sigma_noise=sigma, progress=False, **kwargs)
    return la.fit(DataLoader(TensorDataset(x, y), batch_size=8))


def _regression_xy():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 3, generator=g, dtype=DTYPE)
    y = torch.cat([torch.sin(x[:, :1]), torch.cos(x[:, 1:2])], 1) + 0.1 * torch.randn(16, 2, generator=g, dtype=DTYPE)
    return x, y


def _reference_precision(la, x, likelihood, scale=1.0):
    """s H + diag(delta) from the brute-force GGN (full structure)."""
    h = dense_ggn(la.subset, x, likelihood)
    return scale * h + torch.diag(la.prior_precision_diag)


@pytest.fixture
def full_cls(classification_data):
    x, y = classification_data
    layer_prior = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0], dtype=DTYPE)  # one per parameter tensor
    la = _fit(x, y, "classification", "full", prior=layer_prior)
    return la, x, _reference_precision(la, x, "classification")


def test_full_posterior_matrices_and_density(full_cls, classification_data):
    la, x, precision = full_cls
    y = classification_data[1]
    cov = torch.linalg.inv(precision)
    assert la.prior_precision_diag.shape == (la.n_params,) and float(la.prior_precision_diag[0]) == 0.5
    torch.testing.assert_close(la.mean, torch.nn.utils.parameters_to_vector(la.model.parameters()))
    assert la.n_data == x.shape[0] and float(la.prior_mean) == 0.0
    torch.testing.assert_close(la.posterior_precision, precision)
    torch.testing.assert_close(la.posterior_covariance, cov)
    scale = la.posterior_scale
    torch.testing.assert_close(scale, torch.tril(scale))
    torch.testing.assert_close(scale @ scale.T, cov)
    torch.testing.assert_close(la.log_det_posterior_precision, torch.logdet(precision))
    torch.testing.assert_close(la.log_det_prior_precision, la.prior_precision_diag.log().sum())
    torch.testing.assert_close(la.log_det_ratio, torch.logdet(precision) - la.prior_precision_diag.log().sum())
    torch.testing.assert_close(la.scatter, (la.prior_precision_diag * la.mean**2).sum())
    # the evidence decomposes into log p(D | theta*) and the Occam terms, as laplace-torch writes it
    torch.testing.assert_close(la.log_marginal_likelihood(), la.log_likelihood - 0.5 * (la.log_det_ratio + la.scatter))
    logits = la.model(x)
    torch.testing.assert_close(la.log_likelihood,
                               -torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    # log_prob against torch.distributions, one vector and a batch
    values = la.mean + 0.1 * torch.randn(4, la.n_params, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    dist = torch.distributions.MultivariateNormal(la.mean, precision_matrix=precision)
    torch.testing.assert_close(la.log_prob(values), dist.log_prob(values))
    torch.testing.assert_close(la.log_prob(values[0]), dist.log_prob(values[0]))
    centred = values - la.mean
    torch.testing.assert_close(la.log_prob(values, normalized=False), -0.5 * ((centred @ precision) * centred).sum(-1))


def test_full_functional_variance_and_covariance(full_cls):
    la, x, precision = full_cls
    cov = torch.linalg.inv(precision)
    js = dense_jacobians(la.subset, x[:5])
    expected = torch.einsum("bcp,pq,bkq->bck", js, cov, js)
    torch.testing.assert_close(la.functional_variance(js), expected)
    flat = js.reshape(-1, la.n_params)
    joint = la.functional_covariance(js)
    assert joint.shape == (15, 15)
    torch.testing.assert_close(joint, flat @ cov @ flat.T)
    torch.testing.assert_close(joint[3:6, 3:6], expected[1])  # input-major blocks
    with pytest.raises(ValueError, match="Js must be Jacobians"):
        la.functional_variance(js[..., :-1])


def test_full_call_classification_links(full_cls):
    la, x, precision = full_cls
    xs = x[:6]
    js = dense_jacobians(la.subset, xs)
    mean = la.model(xs).detach()
    f_cov = torch.einsum("bcp,pq,bkq->bck", js, torch.linalg.inv(precision), js)
    probs = la(xs, link_approx="probit")  # laplace-torch's defaults: glm, probit (posthoc's default: centred)
    assert probs.shape == (6, 3)
    torch.testing.assert_close(probs, torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * f_cov.diagonal(0, 1, 2)), -1))
    for link in ("bridge", "bridge_norm"):
        torch.testing.assert_close(la(xs, link_approx=link), _bridge_reference(mean, f_cov, link == "bridge_norm"))
    assert not torch.allclose(la(xs, link_approx="bridge"), la(xs, link_approx="bridge_norm"))
    mc = la(xs, link_approx="mc", n_samples=500, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(mc, links.mc_probs(mean, f_cov, 500, torch.Generator().manual_seed(3)))
    diag_mc = la(xs, link_approx="mc", n_samples=500, diagonal_output=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(diag_mc, links.mc_probs(mean, f_cov.diagonal(0, 1, 2), 500,
                                                       torch.Generator().manual_seed(3)))
    # nn: the average softmax over weight samples drawn with the same generator
    thetas = la.sample(7, generator=torch.Generator().manual_seed(4))
    expected = torch.stack([torch.softmax(la.subset.forward(xs, th), -1) for th in thetas]).mean(0).detach()
    torch.testing.assert_close(la(xs, pred_type="nn", link_approx="mc", n_samples=7,
                                  generator=torch.Generator().manual_seed(4)), expected)
    assert torch.equal(la(xs, link_approx="mc", seed=2), la(xs, link_approx="mc", seed=2))


def _bridge_reference(mean, cov, normalized):
    """laplace-torch's bridge from its definition: condition N(mean, cov) on sum(f) = 0 (Schur complement with
    A = 1^T), optionally normalise, then alpha_k = (1 - 2/C + e^{mu_k} sum_l e^{-mu_l} / C^2) / Sigma_kk.
    """
    n = mean.shape[-1]
    ones = torch.ones(n, 1, dtype=mean.dtype)
    out = []
    for mu, sigma in zip(mean, cov, strict=True):
        gain = sigma @ ones @ torch.linalg.inv(ones.T @ sigma @ ones)
        mu_c = mu - (gain @ (ones.T @ mu.unsqueeze(-1))).squeeze(-1)
        var = torch.diagonal(sigma - gain @ ones.T @ sigma)
        if normalized:
            level = var.mean() / math.sqrt(n / 2)
            mu_c, var = mu_c / level.sqrt(), var / level
        alpha = (1 - 2 / n + torch.exp(mu_c) * torch.exp(-mu_c).sum() / n**2) / var
        out.append(alpha / alpha.sum())
    return torch.stack(out)


def test_bridge_probs_sum_to_one_and_stay_finite():
    mean = torch.tensor([[200.0, 0.0, -3.0], [0.1, 0.2, 0.3]], dtype=DTYPE)
    cov = torch.diag_embed(torch.tensor([[1.0, 2.0, 0.5], [0.3, 0.3, 0.3]], dtype=DTYPE))
    for normalized in (False, True):
        probs = bridge_probs(mean, cov, normalized)
        assert bool(torch.isfinite(probs).all())
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, dtype=DTYPE))
        assert float(probs[0, 0]) > 0.99


def test_full_regression_call_returns_function_moments_without_noise(regression_data):
    x, y = _regression_xy()
    la = _fit(x, y, "regression", "full", prior=1.3, sigma=0.4, n_out=2)
    precision = _reference_precision(la, x, "regression", scale=0.4**-2)
    cov = torch.linalg.inv(precision)
    xs = x[:4]
    js = dense_jacobians(la.subset, xs)
    f_mu, f_var = la(xs)
    torch.testing.assert_close(f_mu, la.model(xs).detach())
    torch.testing.assert_close(f_var, torch.einsum("bcp,pq,bkq->bck", js, cov, js))  # no sigma^2 added
    _, f_diag = la(xs, diagonal_output=True)
    torch.testing.assert_close(f_diag, torch.diagonal(f_var, dim1=1, dim2=2))
    mu_joint, cov_joint = la(xs, joint=True)
    flat = js.reshape(-1, la.n_params)
    torch.testing.assert_close(mu_joint, f_mu.reshape(-1))
    torch.testing.assert_close(cov_joint, flat @ cov @ flat.T)
    thetas = la.sample(9, generator=torch.Generator().manual_seed(1))
    outs = torch.stack([la.subset.forward(xs, th) for th in thetas]).detach()
    nn_mu, nn_var = la(xs, pred_type="nn", link_approx="mc", n_samples=9, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(nn_mu, outs.mean(0))
    torch.testing.assert_close(nn_var, outs.var(0))
    # posthoc's own predictive is unchanged: predict() is the Predictive object
    torch.testing.assert_close(la.predict(xs).cov, f_var)


def test_samples_follow_the_posterior(full_cls):
    la, x, precision = full_cls
    first = la.sample(5, generator=torch.Generator().manual_seed(0))
    assert first.shape == (5, la.n_params)
    assert torch.equal(first, la.sample(5, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(la.sample(3, seed=1), la.sample(3, seed=1))  # posthoc's seed= still works
    many = la.sample(20000, generator=torch.Generator().manual_seed(1))
    cov = torch.linalg.inv(precision)
    # Monte Carlo: the sample covariance's entries have standard error about sqrt(2 / n) * max variance
    torch.testing.assert_close(torch.cov(many.T), cov, atol=6 * math.sqrt(2 / 20000) * float(cov.diagonal().max()),
                               rtol=0)
    with pytest.raises(ValueError, match="not both"):
        la.sample(2, generator=torch.Generator(), seed=1)
    with pytest.raises(TypeError, match="torch.Generator"):
        la.sample(2, generator=3)


def test_functional_and_predictive_samples(full_cls):
    la, x, _ = full_cls
    xs = x[:3]
    pred = la.predict(xs)
    glm = la.functional_samples(xs, n_samples=4, generator=torch.Generator().manual_seed(2))
    assert glm.shape == (4, 3, 3)
    torch.testing.assert_close(glm, links.sample_gaussian(pred.mean, pred.cov, 4, torch.Generator().manual_seed(2)))
    probs = la.predictive_samples(xs, n_samples=4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(probs, torch.softmax(glm, -1))
    diag = la.functional_samples(xs, n_samples=4, diagonal_output=True, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(diag, links.sample_gaussian(pred.mean, pred.var, 4, torch.Generator().manual_seed(2)))
    nn = la.functional_samples(xs, pred_type="nn", n_samples=2, generator=torch.Generator().manual_seed(6))
    thetas = la.sample(2, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(nn, torch.stack([la.subset.forward(xs, th) for th in thetas]).detach())


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_diag_and_kron_against_their_dense_form(classification_data, structure):
    x, y = classification_data
    la = _fit(x, y, "classification", structure, prior=0.9)
    precision = _fitted_structure(la).dense_precision(la.prior_precision, la.factors.scale(la.sigma_noise))
    cov = torch.linalg.inv(precision)
    js = dense_jacobians(la.subset, x[:4])
    torch.testing.assert_close(la.functional_variance(js), torch.einsum("bcp,pq,bkq->bck", js, cov, js))
    flat = js.reshape(-1, la.n_params)
    torch.testing.assert_close(la.functional_covariance(js), flat @ cov @ flat.T)
    torch.testing.assert_close(la.log_det_posterior_precision, torch.logdet(precision))
    values = la.mean + 0.1 * torch.randn(3, la.n_params, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    dist = torch.distributions.MultivariateNormal(la.mean, precision_matrix=precision)
    torch.testing.assert_close(la.log_prob(values), dist.log_prob(values))
    f_var = torch.einsum("bcp,pq,bkq->bck", js, cov, js)
    torch.testing.assert_close(la(x[:4], link_approx="probit"), links.probit(la.model(x[:4]).detach(), f_var))
    torch.testing.assert_close(la(x[:4]), links.probit_centred(la.model(x[:4]).detach(), f_var))  # the default
    if structure == "diag":
        torch.testing.assert_close(la.posterior_precision, torch.diagonal(precision))
        torch.testing.assert_close(la.posterior_scale, torch.diagonal(cov).sqrt())
        with pytest.raises(NotImplementedError, match="posterior_covariance"):
            _ = la.posterior_covariance
    else:  # laplace-torch's KronDecomposed surface (tests/compat/test_kron_decomposed.py); no covariance or scale
        torch.testing.assert_close(la.posterior_precision.to_matrix(), precision)
        for name in ("posterior_scale", "posterior_covariance"):
            with pytest.raises(NotImplementedError, match=f"{name} is not available for hessian_structure='kron'"):
                getattr(la, name)


def test_lowrank_posterior_precision_is_laplace_torch_tuple(classification_data):
    x, y = classification_data
    la = _fit(x, y, "classification", "lowrank", prior=0.8, structure_options={"rank": 4})
    (vectors, values), prior_diag = la.posterior_precision
    dense = vectors @ torch.diag(values) @ vectors.T + torch.diag(prior_diag)
    precision = _fitted_structure(la).dense_precision(la.prior_precision, la.factors.scale(la.sigma_noise))
    torch.testing.assert_close(dense, precision)
    values_ = la.mean + 0.1 * torch.randn(2, la.n_params, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    centred = values_ - la.mean
    torch.testing.assert_close(la.square_norm(values_), ((centred @ precision) * centred).sum(-1))


def test_call_errors_name_the_fix(full_cls):
    la, x, _ = full_cls
    with pytest.raises(ValueError, match="link_approx='mc' only"):
        la(x[:2], pred_type="nn")
    with pytest.raises(TypeError, match="pass the options by name"):
        la(x[:2], "glm", "probit")  # posthoc's old positional order
    with pytest.raises(ValueError, match="link_approx must be one of"):
        la(x[:2], link_approx="softmax")
    with pytest.raises(ValueError, match="pred_type must be one of"):
        la(x[:2], pred_type="gp")
    with pytest.raises(TypeError, match="model keyword arguments"):
        la(x[:2], attention_mask=None)
    with pytest.raises(ValueError, match="not both"):
        la(x[:2], generator=torch.Generator(), seed=1)
