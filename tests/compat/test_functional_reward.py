"""laplace-torch's FunctionalLaplace / hessian_structure="gp" and likelihood="reward_modeling" on posthoc."""

import pytest
import torch
from references import PairRewardNet, dense_jacobians, reward_pairs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from posthoc.compat.laplace import FunctionalLaplace, Laplace
from posthoc.compat.laplace.curvature import CurvlinopsEF, CurvlinopsGGN
from posthoc.laplace.functional import FunctionalLaplace as PosthocFunctional
from posthoc.network.subset import ParameterSubset

DTYPE = torch.float64


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_reward_modeling_fits_as_classification_and_predicts_rewards_as_regression(structure):
    model = PairRewardNet()
    x, y = reward_pairs()
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    la = Laplace(model, "reward_modeling", "all", structure, prior_precision=0.5).fit(loader)
    cls = Laplace(model, "classification", "all", structure, prior_precision=0.5).fit(loader)
    torch.testing.assert_close(la.posterior_precision, cls.posterior_precision)
    torch.testing.assert_close(la.log_marginal_likelihood(), cls.log_marginal_likelihood())
    items = torch.randn(4, 3, dtype=DTYPE)
    f_mu, f_var = la(items)
    jac = dense_jacobians(ParameterSubset(model, "all"), items)  # (4, 1, P)
    precision = la.posterior_precision
    precision = torch.diag(precision) if precision.ndim == 1 else precision
    torch.testing.assert_close(f_mu, model(items).detach())
    torch.testing.assert_close(f_var, torch.einsum("bcp,pq,bdq->bcd", jac, torch.linalg.inv(precision), jac))
    torch.testing.assert_close(la(x[:3], fitting=True), cls(x[:3]))  # the pair's class probabilities
    assert la.predictive_samples(items, n_samples=5).shape == (5, 4, 1)  # rewards, not softmax


def test_reward_modeling_with_kron_runs():
    model = PairRewardNet()
    x, y = reward_pairs()
    la = Laplace(model, "reward_modeling", "all").fit(DataLoader(TensorDataset(x, y), batch_size=5))
    f_mu, f_var = la(torch.randn(4, 3, dtype=DTYPE))
    assert f_mu.shape == (4, 1) and f_var.shape == (4, 1, 1) and bool((f_var > 0).all())


def test_gp_structure_gives_a_functional_laplace_with_laplace_torch_arguments():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DTYPE)
    x = torch.randn(15, 3, dtype=DTYPE)
    loader = DataLoader(TensorDataset(x, torch.randn(15, 2, dtype=DTYPE)), batch_size=4)
    la = Laplace(model, "regression", "all", "gp", n_subset=6, prior_precision=0.3, sigma_noise=0.2)
    assert isinstance(la, FunctionalLaplace) or isinstance(la, PosthocFunctional)
    la.fit(loader)
    positional = FunctionalLaplace(model, "regression", 6, 0.2, 0.3, backend=CurvlinopsGGN).fit(loader)
    for mine, theirs in zip(la(x[:3]), positional(x[:3]), strict=True):
        torch.testing.assert_close(mine, theirs)
    assert float(la.gp_kernel_prior_variance) == pytest.approx(6 / 15 / 0.3)
    with pytest.raises(ValueError, match="subset_of_weights='all'"):
        Laplace(model, "regression", "last_layer", "gp", n_subset=6)
    with pytest.raises(ValueError, match="GGN backend"):
        FunctionalLaplace(model, "regression", 6, backend=CurvlinopsEF)
