"""FunctionalLaplace's sampling, enable_backprop and state_dict; KronLaplace's damping option."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from posthoc.compat.laplace import KronLaplace, Laplace

DTYPE = torch.float64


def _gp(likelihood, **kwargs):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 2, generator=g, dtype=DTYPE)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long() if likelihood == "classification" else torch.sin(x)
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3 if likelihood == "classification" else 2)).to(DTYPE)
    options = {"sigma_noise": 0.3} if likelihood == "regression" else {}
    la = Laplace(net, likelihood, "all", "gp", n_subset=15, prior_precision=0.7, **options, **kwargs)
    return la.fit(DataLoader(TensorDataset(x, y), batch_size=10)), x


def test_functional_samples_have_the_gp_moments():
    la, x = _gp("regression")
    f_mu, f_cov = la(x[:3], joint=True)  # (6,), (6, 6): input-major rows
    draws = la.functional_samples(x[:3], n_samples=40000, generator=torch.Generator().manual_seed(0), joint=True)
    assert draws.shape == (40000, 3, 2)
    flat = draws.reshape(40000, -1)
    scale = f_cov.diagonal().sqrt()
    assert float(((flat.mean(0) - f_mu) / scale).abs().max()) < 5 / 40000**0.5  # 5 standard errors
    torch.testing.assert_close(torch.cov(flat.T), f_cov, rtol=0.05, atol=0.05 * float(f_cov.diagonal().max()))
    per_input = la.functional_samples(x[:3], n_samples=40000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(per_input.mean(0), la(x[:3])[0], rtol=0, atol=0.05 * float(scale.max()))
    _, f_var = la(x[:3])
    torch.testing.assert_close(torch.stack([torch.cov(per_input[:, b].T) for b in range(3)]), f_var, rtol=0.05,
                               atol=0.05 * float(f_var.diagonal(dim1=-2, dim2=-1).max()))
    independent = la.functional_samples(x[:3], n_samples=40000, generator=torch.Generator().manual_seed(2),
                                        diagonal_output=True, joint=True).reshape(40000, -1)
    kept = torch.cov(independent.T)
    assert float(kept[0, 1].abs()) < 0.05 * float(kept[0, 0])  # outputs of one input decorrelated
    torch.testing.assert_close(kept[0, 2], f_cov[0, 2], rtol=0.1, atol=0.05 * float(f_cov[0, 0]))  # inputs kept
    repeat = la.functional_samples(x[:3], n_samples=5)  # no generator: the Laplace's seed, reproducible
    torch.testing.assert_close(repeat, la.functional_samples(x[:3], n_samples=5))


def test_predictive_samples_are_softmax_of_the_functional_ones():
    la, x = _gp("classification")
    f = la.functional_samples(x[:4], n_samples=7, generator=torch.Generator().manual_seed(3))
    probs = la.predictive_samples(x[:4], n_samples=7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(probs, torch.softmax(f, -1))
    with pytest.raises(ValueError, match="pred_type must be one of"):
        la.functional_samples(x[:4], pred_type="laplace")


def test_enable_backprop_gives_the_gradient_of_the_gp_variance_in_x():
    la, x = _gp("regression", enable_backprop=True)
    point = x[:1].clone().requires_grad_(True)
    f_mu, f_var = la(point)
    assert f_var.requires_grad
    (grad,) = torch.autograd.grad(f_var[0, 0, 0], point)
    step = 1e-6
    numeric = torch.zeros(2, dtype=DTYPE)
    with torch.no_grad():
        for i in range(2):
            shift = torch.zeros(1, 2, dtype=DTYPE)
            shift[0, i] = step
            numeric[i] = (la(x[:1] + shift)[1][0, 0, 0] - la(x[:1] - shift)[1][0, 0, 0]) / (2 * step)
    torch.testing.assert_close(grad[0], numeric, rtol=1e-5, atol=1e-9)
    la.enable_backprop = False
    assert not la(point)[1].requires_grad


def test_kron_damping_option():
    net = nn.Sequential(nn.Linear(2, 3)).to(DTYPE)
    KronLaplace(net, "classification", damping=False)  # laplace-torch's default: posthoc's exact prior
    with pytest.raises(NotImplementedError, match="damping=True"):
        Laplace(net, "classification", "all", "kron", damping=True)


def test_functional_state_dict_restores_the_fit():
    la, x = _gp("classification")
    state = la.state_dict()
    fresh = Laplace(la.model, "classification", "all", "gp", n_subset=15)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x[:4]), la(x[:4]))
    torch.testing.assert_close(fresh.log_marginal_likelihood(), la.log_marginal_likelihood())
    assert fresh.indices.tolist() == la.indices.tolist() and float(fresh.prior_precision) == 0.7
    with pytest.raises(ValueError, match="same settings"):
        Laplace(la.model, "classification", "all", "gp", n_subset=10).load_state_dict(state)
    with torch.no_grad():
        la.model[0].weight.add_(0.1)
    with pytest.raises(ValueError, match="weights differ"):
        Laplace(la.model, "classification", "all", "gp", n_subset=15).load_state_dict(state)
    with pytest.raises(RuntimeError, match="not fitted"):
        Laplace(la.model, "classification", "all", "gp", n_subset=15).state_dict()
