"""laplace-torch's grid search (``loss=`` callables and metrics) and mapping batches, on FunctionalLaplace and Laplace.

Each grid search is checked against a loop written here that scores every grid value on its own.
"""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from posthoc.compat.laplace import Laplace
from posthoc.laplace.parity_tuning import gridsearch_with_loss

DTYPE = torch.float64
GRID = torch.logspace(-4, 4, 9, dtype=DTYPE)


def _trained(likelihood):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, generator=g, dtype=DTYPE)
    if likelihood == "classification":
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        loss_fn = nn.functional.cross_entropy
    else:
        y = torch.sin(2 * x[:, :1]) + 0.2 * torch.randn(50, 1, generator=g, dtype=DTYPE)
        loss_fn = nn.functional.mse_loss
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3 if likelihood == "classification" else 1)).to(DTYPE)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        loss_fn(net(x[:30]), y[:30]).backward()
        optimizer.step()
    return net, x, y


def _loaders(x, y):
    return (DataLoader(TensorDataset(x[:30], y[:30]), batch_size=10),
            DataLoader(TensorDataset(x[30:], y[30:]), batch_size=8))


def _gp(net, likelihood, train, **kwargs):
    options = {"sigma_noise": 0.3} if likelihood == "regression" else {}
    la = Laplace(net, likelihood, "all", "gp", n_subset=20, prior_precision=0.5, **options, **kwargs)
    return la.fit(train)


def _nll(probs, y):
    return -probs.gather(-1, y.reshape(-1, 1)).log().mean()


def _gaussian_nll(f_mu, f_var, y):  # laplace-torch's offline regression loss takes (means, variances, targets)
    var = f_var.reshape(y.shape) + 0.09
    return (0.5 * var.log() + 0.5 * (y - f_mu) ** 2 / var).mean()


def _best(la, x_val, y_val, score):
    losses = []
    for delta in GRID:
        la.prior_precision = delta
        losses.append(float(score(la(x_val), y_val)))
    return GRID[losses.index(min(losses))], losses


class _MeanNLL:
    """A torchmetrics-style running metric (update / compute / reset)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.total, self.count = 0.0, 0

    def update(self, probs, y):
        self.total += float(-probs.gather(-1, y.reshape(-1, 1)).log().sum())
        self.count += len(y)

    def compute(self):
        return torch.tensor(self.total / self.count)


@pytest.mark.parametrize("make", ["gp", "kron"])
def test_classification_gridsearch_with_a_callable_and_a_metric_scores_each_value(make):
    net, x, y = _trained("classification")
    train, val = _loaders(x, y)
    la = _gp(net, "classification", train) if make == "gp" else Laplace(net, "classification", "all", "kron").fit(train)
    expected, losses = _best(la, x[30:], y[30:], _nll)
    assert losses.index(min(losses)) not in (0, len(GRID) - 1)  # an interior optimum, so the test can fail
    pred_type = "gp" if make == "gp" else "glm"
    for loss in (_nll, _MeanNLL()):
        la.prior_precision = 1.0
        la.optimize_prior_precision(pred_type=pred_type, method="gridsearch", val_loader=val, loss=loss, grid_size=9)
        torch.testing.assert_close(la.prior_precision, expected.reshape(1))
    la.prior_precision = 1.0  # no loss: the validation NLL, the same optimum here
    la.optimize_prior_precision(pred_type=pred_type, method="gridsearch", val_loader=val, grid_size=9)
    torch.testing.assert_close(la.prior_precision, expected.reshape(1))


@pytest.mark.parametrize("make", ["gp", "full"])
def test_regression_gridsearch_passes_means_and_variances_to_the_loss(make):
    net, x, y = _trained("regression")
    train, val = _loaders(x, y)
    la = _gp(net, "regression", train) if make == "gp" else Laplace(net, "regression", "all", "full",
                                                                    sigma_noise=0.3).fit(train)
    expected, _ = _best(la, x[30:], y[30:], lambda out, t: _gaussian_nll(*out, t))
    pred_type = "gp" if make == "gp" else "glm"
    la.optimize_prior_precision(pred_type=pred_type, method="gridsearch", val_loader=val, loss=_gaussian_nll,
                                grid_size=9)
    torch.testing.assert_close(la.prior_precision, expected.reshape(1))
    # no loss: the NLL of y with sigma_noise^2 = 0.09 added, as _gaussian_nll scores it (laplace-torch's default,
    # the MSE of f_mu, would not depend on delta)
    la.prior_precision = 1.0
    la.optimize_prior_precision(pred_type=pred_type, method="gridsearch", val_loader=val, grid_size=9)
    torch.testing.assert_close(la.prior_precision, expected.reshape(1))


def test_functional_gridsearch_options_and_errors():
    net, x, y = _trained("classification")
    train, val = _loaders(x, y)
    la = _gp(net, "classification", train)
    la.optimize_prior_precision(method="gridsearch", val_loader=val, loss=_nll, grid_size=3, log_prior_prec_min=-1,
                                log_prior_prec_max=1, log_prior_prec_base=2.0)
    assert float(la.prior_precision) in (0.5, 1.0, 2.0)
    with pytest.raises(ValueError, match="needs val_loader"):
        la.optimize_prior_precision(method="gridsearch")
    with pytest.raises(ValueError, match="method must be one of"):
        la.optimize_prior_precision(method="cv", val_loader=val)
    with pytest.raises(ValueError, match="log_prior_prec_base"):
        la.optimize_prior_precision(method="gridsearch", val_loader=val, log_prior_prec_base=1.0)
    with pytest.warns(UserWarning, match="val_loader is ignored"):
        la.optimize_prior_precision(val_loader=val, n_steps=2)
    la.optimize_prior_precision(n_steps=3, init_prior_prec=torch.tensor(2.0))
    assert math.isfinite(float(la.prior_precision))


class _Pairs(Dataset):
    """Items as mappings, laplace-torch's Hugging Face layout."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


class _TakesMapping(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, data):
        return self.net(data["input_ids"])


def test_functional_laplace_reads_mapping_batches_like_tensor_ones():
    net, x, y = _trained("classification")
    tensors = _gp(net, "classification", _loaders(x, y)[0])
    mapped = _gp(_TakesMapping(net), "classification", DataLoader(_Pairs(x[:30], y[:30]), batch_size=10))
    torch.testing.assert_close(mapped.indices, tensors.indices)
    torch.testing.assert_close(mapped.log_marginal_likelihood(), tensors.log_marginal_likelihood())
    torch.testing.assert_close(mapped({"input_ids": x[30:], "labels": y[30:]}), tensors(x[30:]))
    mapped.optimize_prior_precision(method="gridsearch", val_loader=DataLoader(_Pairs(x[30:], y[30:]), batch_size=8),
                                    loss=_nll, grid_size=9)
    tensors.optimize_prior_precision(method="gridsearch", val_loader=_loaders(x, y)[1], loss=_nll, grid_size=9)
    torch.testing.assert_close(mapped.prior_precision, tensors.prior_precision)


def test_a_grid_value_whose_posterior_cannot_be_factorised_scores_infinity():
    state = {}

    def set_prior(delta):
        state["delta"] = float(delta)

    def predict(x):
        if state["delta"] < 1:  # as a Cholesky factorisation of a tiny prior in float32 fails
            raise torch.linalg.LinAlgError("not positive-definite")
        return torch.full((len(x), 2), 0.5 / state["delta"])

    batches = [(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))]
    best = gridsearch_with_loss(set_prior, predict, batches, _nll, GRID)
    assert float(best) == 1.0  # the smallest finite loss, -log(0.5 / delta), among the values that factorise
    with pytest.raises(FloatingPointError, match="not finite for any prior precision"):
        gridsearch_with_loss(set_prior, predict, batches, _nll, GRID[:4])
