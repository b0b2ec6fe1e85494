"""fit(..., override=False) (continual learning) and prior_mean against refits and dense float64 GGNs."""

import pytest
import torch
from references import dense_ggn, mlp_data, small_mlp
from torch.utils.data import DataLoader, TensorDataset

from posthoc.compat.laplace import Laplace
from posthoc.laplace.laplace import Laplace as PosthocLaplace

DTYPE = torch.float64


def _loader(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=7)


def _la(likelihood, structure, model=None, **kwargs):
    model = small_mlp().to(DTYPE) if model is None else model
    return Laplace(model, likelihood, "all", structure, prior_precision=0.8, sigma_noise=1.0, **kwargs)


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_sequential_fits_equal_the_fit_on_the_union(structure, likelihood):
    x, y = mlp_data(likelihood, 24)
    model = small_mlp().to(DTYPE)
    union = _la(likelihood, structure, model).fit(_loader(x, y))
    sequential = _la(likelihood, structure, model).fit(_loader(x[:10], y[:10]))
    sequential.fit(_loader(x[10:], y[10:]), override=False)
    assert sequential.n_data == union.n_data == 24
    torch.testing.assert_close(sequential.posterior_precision, union.posterior_precision)
    torch.testing.assert_close(sequential.log_marginal_likelihood(), union.log_marginal_likelihood())
    torch.testing.assert_close(sequential.log_likelihood, union.log_likelihood)
    x_test = x[:4] + 0.3
    for mine, theirs in zip(sequential(x_test), union(x_test), strict=False) if likelihood == "regression" else [
            (sequential(x_test), union(x_test))]:
        torch.testing.assert_close(mine, theirs)
    # override=True (the default) starts again: the second fit alone
    alone = _la(likelihood, structure, model).fit(_loader(x[10:], y[10:]))
    sequential.fit(_loader(x[10:], y[10:]))
    torch.testing.assert_close(sequential.posterior_precision, alone.posterior_precision)
    assert sequential.n_data == 14


def test_sequential_fit_at_new_weights_sums_each_tasks_ggn_and_recentres():
    x, y = mlp_data("classification", 24)
    model = small_mlp().to(DTYPE)
    la = _la("classification", "full", model).fit(_loader(x[:10], y[:10]))
    theta_a = la.mean.clone()
    ggn_a = dense_ggn(la.subset, x[:10], "classification")
    with torch.no_grad():  # "train on task B": move the weights
        for p in model.parameters():
            p.add_(0.05 * torch.ones_like(p))
    la.prior_mean = theta_a
    la.fit(_loader(x[10:], y[10:]), override=False)
    ggn_b = dense_ggn(la.subset, x[10:], "classification")  # at the new weights
    delta = la.prior_precision_diag
    torch.testing.assert_close(la.posterior_precision, ggn_a + ggn_b + torch.diag(delta))
    theta_b = torch.nn.utils.parameters_to_vector(model.parameters())
    torch.testing.assert_close(la.mean, theta_b)
    # the prior's centre enters the evidence's scatter: (theta_B - theta_A)^T diag(delta) (theta_B - theta_A)
    torch.testing.assert_close(la.scatter, ((theta_b - theta_a) ** 2 * delta).sum())
    centred = la.log_marginal_likelihood()
    la.prior_mean = 0.0
    torch.testing.assert_close(centred - la.log_marginal_likelihood(),
                               -0.5 * (((theta_b - theta_a) ** 2 - theta_b**2) * delta).sum())


def test_posthoc_laplace_accumulates_too():
    x, y = mlp_data("regression", 24)
    model = small_mlp().to(DTYPE)
    union = PosthocLaplace(model, "regression", "all", "diag", progress=False).fit(_loader(x, y))
    la = PosthocLaplace(model, "regression", "all", "diag", progress=False).fit(_loader(x[:5], y[:5]))
    la.fit(_loader(x[5:], y[5:]), override=False)
    torch.testing.assert_close(la.posterior_variance(), union.posterior_variance())
    torch.testing.assert_close(la.log_marginal_likelihood(), union.log_marginal_likelihood())


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_kron_combines_factors_as_the_kfac_of_the_union(subset):
    x, y = mlp_data("classification", 24)
    model = small_mlp().to(DTYPE)
    union = Laplace(model, "classification", subset, "kron", prior_precision=0.8).fit(_loader(x, y))
    sequential = Laplace(model, "classification", subset, "kron", prior_precision=0.8).fit(_loader(x[:10], y[:10]))
    first = sequential.log_marginal_likelihood()
    sequential.fit(_loader(x[10:], y[10:]), override=False)
    assert sequential.n_data == 24
    torch.testing.assert_close(sequential.log_marginal_likelihood(), union.log_marginal_likelihood())
    torch.testing.assert_close(sequential.posterior_variance, union.posterior_variance)
    torch.testing.assert_close(sequential(x[:3]), union(x[:3]))
    assert not torch.allclose(first, union.log_marginal_likelihood())
    # a state dict keeps the eigendecompositions only, not the factors to combine
    state = sequential.state_dict()
    restored = Laplace(model, "classification", subset, "kron", prior_precision=0.8)
    restored.load_state_dict(state)
    with pytest.raises(NotImplementedError, match="load_state_dict"):
        restored.fit(_loader(x[:5], y[:5]), override=False)


@pytest.mark.parametrize("structure", ["ekfac", "lowrank"])
def test_structures_that_do_not_accumulate_raise_before_fitting(structure):
    x, y = mlp_data("classification", 24)
    la = _la("classification", structure)
    la.fit(_loader(x, y))
    before = la.log_marginal_likelihood()
    with pytest.raises(NotImplementedError, match="accumulates hessian_structure 'full', 'diag' or 'kron'"):
        la.fit(_loader(x[:5], y[:5]), override=False)
    torch.testing.assert_close(la.log_marginal_likelihood(), before)  # the earlier fit is kept


def test_prior_mean_must_match_the_parameters():
    la = _la("classification", "diag")
    with pytest.raises(ValueError, match="prior_mean"):
        la.prior_mean = torch.zeros(3, dtype=DTYPE)
