"""marglik_training (online Laplace, Immer et al. 2021) on a small float64 regression task."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from posthoc.laplace.laplace import Laplace
from posthoc.laplace.marglik_training import marglik_training

DTYPE = torch.float64


def _sinusoid(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g, dtype=DTYPE) * 6 - 3
    return x, torch.sin(x) + 0.1 * torch.randn(n, 1, generator=g, dtype=DTYPE)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).to(DTYPE)


def test_marglik_training_tunes_prior_and_noise_while_training():
    x, y = _sinusoid()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    model = _mlp()
    la, trained, margliks, losses = marglik_training(
        model, loader, "regression", hessian_structure="full", optimizer_kwargs={"lr": 0.02, "weight_decay": 1.0},
        n_epochs=40, n_hypersteps=10, marglik_frequency=5, lr_hyp=0.1, dict_key_x="input", dict_key_y="target")
    assert trained is model and len(losses) == 40 and len(margliks) == 8 * 10
    assert losses[-1] < 0.5 * losses[0]  # MAP training made progress
    assert la.prior_precision.shape == (4,)  # layerwise: one per parameter tensor
    assert not torch.allclose(la.prior_precision, torch.ones(4, dtype=DTYPE))  # the prior moved
    assert float(la.sigma_noise) < 0.5  # noise learnt towards the true 0.1 from 1
    # la is fitted at the returned weights, and its hyperparameters beat the initial ones on the evidence
    assert la.n_data == 48 and la.log_det_posterior_precision.isfinite()
    torch.testing.assert_close(la.subset.theta_map, torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    start = Laplace(model, "regression", "all", "full", prior_precision=1.0, sigma_noise=1.0, progress=False).fit(loader)
    assert float(la.log_marginal_likelihood()) > float(start.log_marginal_likelihood())
    assert la.predict(x[:3]).cov.shape == (3, 1, 1)


def test_marglik_training_scalar_prior_classification_and_errors():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 2, generator=g, dtype=DTYPE)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)).to(DTYPE)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    la, _, margliks, losses = marglik_training(model, loader, "classification", "diag", prior_structure="scalar",
                                               n_epochs=4, n_hypersteps=3, marglik_frequency=2,
                                               optimizer_kwargs={"lr": 0.05})
    assert la.prior_precision.shape == (1,) and len(margliks) == 6 and len(losses) == 4
    assert float(la.prior_precision) != 1.0 and float(la.sigma_noise) == 1.0
    with pytest.raises(NotImplementedError, match="temperature"):
        marglik_training(model, loader, "classification", temperature=0.5)
    with pytest.raises(NotImplementedError, match="enable_backprop"):
        marglik_training(model, loader, "classification", enable_backprop=True)
