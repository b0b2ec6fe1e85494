"""Streamlined never predicts from a posterior that no longer matches the model, and predicts the eval-mode network.

- weights changed after the Laplace fit (the propagated mean is the new network, the covariance the old
  posterior's): predict raises;
- the Laplace refitted or retuned after Streamlined read it: the next prediction reads the new posterior (never
  the old covariance), and raises if a variance scale was fitted to the old one;
- a model left in train mode (Dropout, BatchNorm): predictions are the eval-mode network's and every module's
  train/eval flag is given back as found;
- fit_variance_scale takes the dict_key_x / dict_key_y its error message suggests.
"""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import posthoc
from posthoc.predictive import GaussianPredictive
from posthoc.predictive.scale import fit_variance_scale as fit_scale

pytestmark = pytest.mark.usefixtures("float64_default")


def _data(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    x, _ = _data()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        for _ in range(5):
            model(x)
    return model.eval()


def _fitted(structure: str = "diag"):
    model = _model()
    x, y = _data()
    la = posthoc.Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                         prior_precision=1.0)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=32))
    return model, la, x


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_weights_changed_after_fit_raise(structure):
    model, la, x = _fitted(structure)
    sp = posthoc.Streamlined(model, posterior=la)
    before = sp.predict(x[:8])
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(0.05)
    with pytest.raises(RuntimeError, match="changed since fit"):
        sp.predict(x[:8])
    with pytest.raises(RuntimeError, match="changed since fit"):
        sp.fit_variance_scale(DataLoader(TensorDataset(*_data(32, 1)), batch_size=16))
    with pytest.raises(RuntimeError, match="changed since fit"):
        posthoc.Streamlined(model, posterior=la)
    # the BatchNorm running statistics are part of the network too
    model.load_state_dict(saved)
    model[1].running_mean.add_(0.1)
    with pytest.raises(RuntimeError, match="changed since fit"):
        sp.predict(x[:8])
    # the weights the posterior was fitted at, written back: predictions as before
    model.load_state_dict(saved)
    after = sp.predict(x[:8])
    torch.testing.assert_close(after.mean, before.mean, rtol=0, atol=0)
    torch.testing.assert_close(after.cov, before.cov, rtol=0, atol=0)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_laplace_retuned_after_build_takes_effect(structure):
    """Tuning the prior (or refitting) after building Streamlined is read at the next prediction: the same
    predictive as a Streamlined built after the tuning, and not the one of the old prior."""
    model, la, x = _fitted(structure)
    sp = posthoc.Streamlined(model, posterior=la)
    var_before = sp.predict(x[:8]).var
    la.prior_precision = 100.0
    fresh = posthoc.Streamlined(model, posterior=la).predict(x[:8])
    tuned = sp.predict(x[:8])
    torch.testing.assert_close(tuned.cov, fresh.cov, rtol=0, atol=0)
    assert bool((tuned.var < 0.2 * var_before).all())  # a 100x prior shrinks the output variance
    la.prior_precision = 1.0
    torch.testing.assert_close(sp.predict(x[:8]).var, var_before, rtol=0, atol=0)
    # refitted on other data: a new curvature object, read again
    la.fit(DataLoader(TensorDataset(*_data(64, 3)), batch_size=32))
    torch.testing.assert_close(sp.predict(x[:8]).cov, posthoc.Streamlined(model, posterior=la).predict(x[:8]).cov,
                               rtol=0, atol=0)


def test_regression_noise_follows_the_laplace_unless_given():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(40, 4)
    y = x[:, :1] + 0.1 * torch.randn(40, 1)
    la = posthoc.Laplace(model, "regression", hessian_structure="diag", sigma_noise=0.5)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=20))
    following = posthoc.Streamlined(model, posterior=la)
    pinned = posthoc.Streamlined(model, posterior=la, sigma_noise=0.3)
    la.sigma_noise = 0.2
    following.predict(x[:4])
    pinned.predict(x[:4])
    assert following.sigma_noise == pytest.approx(0.2)
    assert pinned.sigma_noise == pytest.approx(0.3)


def test_retuned_after_fit_variance_scale_raises():
    model, la, x = _fitted()
    sp = posthoc.Streamlined(model, posterior=la)
    sp.fit_variance_scale(DataLoader(TensorDataset(*_data(32, 1)), batch_size=16))
    assert sp.variance_scale != 1.0
    la.prior_precision = 10.0
    with pytest.raises(RuntimeError, match=r"fit_variance_scale\(val_loader\) again"):
        sp.predict(x[:8])
    sp.variance_scale = 1.0
    torch.testing.assert_close(sp.predict(x[:8]).cov, posthoc.Streamlined(model, posterior=la).predict(x[:8]).cov,
                               rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["diagonal", "full"])
def test_train_mode_model_predicts_eval_network_and_keeps_flags(mode):
    model, la, x = _fitted()
    sp = posthoc.Streamlined(model, posterior=la, activation_covariance=mode)
    reference = sp.predict(x[:16])
    with torch.no_grad():
        eval_logits = model(x[:16])
    # the caller's mixed flags: everything in train mode except the last layer
    model.train()
    model[4].eval()
    flags = [m.training for m in model.modules()]
    pred = sp.predict(x[:16])
    assert [m.training for m in model.modules()] == flags
    torch.testing.assert_close(pred.mean, eval_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred.mean, reference.mean, rtol=0, atol=0)
    torch.testing.assert_close(pred.cov, reference.cov, rtol=0, atol=0)
    # a fresh object checks its propagated mean against model(x) on its first batch, also in train mode
    fresh = posthoc.Streamlined(model, posterior=la, activation_covariance=mode).predict(x[:16])
    torch.testing.assert_close(fresh.mean, eval_logits, rtol=1e-12, atol=1e-12)
    assert [m.training for m in model.modules()] == flags


def test_fit_variance_scale_takes_the_dict_keys_it_suggests():
    model, la, _ = _fitted()
    xv, yv = _data(64, 2)
    tuples = DataLoader(TensorDataset(xv, yv), batch_size=16)
    dicts = [{"image": xv[i:i + 16], "label": yv[i:i + 16]} for i in range(0, 64, 16)]
    sp = posthoc.Streamlined(model, posterior=la)
    expected = sp.fit_variance_scale(tuples)
    with pytest.raises(KeyError, match="dict_key_x") as err:
        sp.fit_variance_scale(dicts)
    assert "dict_key_y" in str(err.value)
    got = sp.fit_variance_scale(dicts, dict_key_x="image", dict_key_y="label")
    assert got == pytest.approx(expected, rel=1e-12)
    assert sp.variance_scale == got


def test_fit_variance_scale_checks_labels_against_the_outputs():
    model, la, _ = _fitted()
    xv, yv = _data(32, 3)
    sp = posthoc.Streamlined(model, posterior=la)
    with pytest.raises(ValueError, match="labels"):
        sp.fit_variance_scale(DataLoader(TensorDataset(xv, yv + 3), batch_size=16))


def test_regression_targets_of_another_layout_are_refused():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 2, generator=g)
    pred = GaussianPredictive(mean, var=torch.full_like(mean, 0.3))
    targets = mean + 0.1 * torch.randn(4, 2, generator=g)
    kappa = fit_scale(pred, targets, "regression", sigma_noise=0.1)
    assert kappa > 0
    with pytest.raises(ValueError, match="do not match"):
        fit_scale(pred, targets.T.contiguous(), "regression", sigma_noise=0.1)  # (2, 4): would reshape silently
    with pytest.raises(ValueError, match="do not match"):
        fit_scale(pred, targets.reshape(-1), "regression", sigma_noise=0.1)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_a_parameter_held_by_two_layers_of_a_chain_is_refused(structure):
    """On 83bdd0f a weight tied between two layers of a chain got its posterior in the first holder only: the
    second layer's use was propagated as a fixed weight, and the two uses as independent (variances wrong)."""
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(4, 3)).eval()
    x, y = _data()
    la = posthoc.Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                         prior_precision=1.0, progress=False)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=32))
    with pytest.raises(ValueError, match="tied weights"):
        posthoc.Streamlined(model, posterior=la).predict(x[:4])
