"""posthoc.predictive.tuning: the one grid search, evidence maximisation and hyperparameter validation of Laplace
and ScaLLA; laplace-torch's optimize_prior_precision signature and the deprecated posthoc spellings."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import posthoc.laplace.laplace as laplace_module
import posthoc.scalla.scalla as scalla_module
import posthoc.scalla.tuning as scalla_tuning_module
from posthoc import Laplace, ScaLLA
from posthoc.likelihood import Likelihood
from posthoc.predictive import tuning
from posthoc.predictive.tuning import (
    PriorStructure,
    checked_grid,
    checked_sigma_noise,
    default_grid,
    grid_search,
    maximise_evidence,
    method_choice,
    prior_structure_choice,
    tune_sigma_noise_choice,
)

DTYPE = torch.float64


# ----------------------------------------------------------------- the module on toy objectives
def test_grid_search_returns_the_minimiser_and_the_first_of_ties():
    grid = torch.tensor([0.1, 1.0, 10.0, 100.0], dtype=DTYPE)
    assert float(grid_search(lambda d: (math.log10(float(d)) - 1.2) ** 2, grid)) == 10.0
    assert float(grid_search(lambda d: 3.0 if float(d) < 50 else 1.0, grid)) == 100.0
    assert float(grid_search(lambda d: 1.0, grid)) == 0.1  # all tied: the first


def test_grid_search_counts_nan_as_infinite_and_raises_when_nothing_is_finite():
    grid = torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE)
    losses = {1.0: math.nan, 2.0: 5.0, 3.0: 4.0}
    assert float(grid_search(lambda d: losses[float(d)], grid)) == 3.0
    with pytest.raises(FloatingPointError, match="validation NLL is not finite for any prior precision"):
        grid_search(lambda d: math.nan, grid)
    with pytest.raises(FloatingPointError, match="my loss is not finite"):
        grid_search(lambda d: math.inf, grid, what="my loss")


def test_grid_search_calls_evaluate_once_per_value_in_order():
    seen = []
    grid = torch.tensor([3.0, 1.0, 2.0], dtype=DTYPE)
    grid_search(lambda d: seen.append(float(d)) or 0.0, grid, sum_ranks=True)  # single process: a no-op sum
    assert seen == [3.0, 1.0, 2.0]


def test_maximise_evidence_finds_the_maximum_and_tunes_sigma_only_when_asked():
    def evidence(delta, sigma):
        return -(delta.log() - math.log(2.0)).square().sum() - (sigma.log() - math.log(0.5)).square()

    start = torch.zeros(3, dtype=DTYPE)
    delta, sigma = maximise_evidence(evidence, start, torch.tensor(1.0, dtype=DTYPE), False, 400, 0.05)
    torch.testing.assert_close(delta, torch.full((3,), 2.0, dtype=DTYPE), rtol=1e-3, atol=0)
    assert sigma is None and not start.requires_grad and float(start.sum()) == 0.0  # the start is copied
    delta, sigma = maximise_evidence(evidence, torch.zeros((), dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE), True,
                                     400, 0.05)
    assert abs(float(sigma) - 0.5) < 1e-3 and abs(float(delta) - 2.0) < 2e-3
    with pytest.raises(FloatingPointError, match="the toy evidence became non-finite"):
        maximise_evidence(lambda d, s: d.sum() * math.inf, start, torch.tensor(1.0), False, 3, 0.1, "toy evidence")


def test_the_one_validation_of_sigma_grid_and_tuning_choices():
    with pytest.raises(ValueError, match="sigma_noise must be a scalar"):
        checked_sigma_noise(torch.ones(2), Likelihood.REGRESSION)
    with pytest.raises(ValueError, match="sigma_noise"):
        checked_sigma_noise(torch.tensor(-1.0), Likelihood.REGRESSION)
    with pytest.raises(ValueError, match="leave it at 1 for classification"):
        checked_sigma_noise(torch.tensor(0.5), Likelihood.CLASSIFICATION)
    assert checked_sigma_noise(torch.tensor([0.5]), Likelihood.REGRESSION).shape == ()
    with pytest.raises(ValueError, match="non-empty 1-D"):
        checked_grid(torch.ones(2, 2), DTYPE)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        checked_grid(torch.ones(0), DTYPE)
    with pytest.raises(ValueError, match="grid"):
        checked_grid([1.0, 0.0], DTYPE)
    assert checked_grid(2.0, torch.float32).shape == (1,)
    assert tune_sigma_noise_choice(None, Likelihood.REGRESSION) is True
    assert tune_sigma_noise_choice(None, Likelihood.CLASSIFICATION) is False
    with pytest.raises(ValueError, match="regression only"):
        tune_sigma_noise_choice(True, Likelihood.CLASSIFICATION)
    torch.testing.assert_close(default_grid(-4, 4, 21, DTYPE), torch.logspace(-4, 4, 21, dtype=DTYPE), rtol=0, atol=0)


def test_the_old_spellings_warn_and_name_the_new_one():
    with pytest.warns(DeprecationWarning, match="prior_structure='layerwise'"):
        assert prior_structure_choice("layer") is PriorStructure.LAYERWISE
    with pytest.warns(DeprecationWarning, match="prior_structure='diag'"):
        assert prior_structure_choice("parameter") is PriorStructure.DIAG
    with pytest.warns(DeprecationWarning, match="method='gridsearch'"):
        assert method_choice("gridsearch", "marglik") == (None, tuning.PriorOptimization.GRIDSEARCH)
    with pytest.raises(TypeError, match="given twice"):
        method_choice("marglik", "gridsearch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prior_structure_choice("diag") is PriorStructure.DIAG
        assert method_choice("nn", "gridsearch") == ("nn", tuning.PriorOptimization.GRIDSEARCH)
    with pytest.raises(ValueError, match="'scalar', 'layerwise', 'diag'"):
        prior_structure_choice("blocks")


# ----------------------------------------------------------------- the estimators use it
def _problem() -> tuple[nn.Module, DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g, dtype=DTYPE)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE).eval()
    return model, DataLoader(TensorDataset(x[:40], y[:40]), batch_size=20), \
        DataLoader(TensorDataset(x[40:], y[40:]), batch_size=20)


def _laplace(model, train) -> Laplace:
    return Laplace(model, "classification", "all", "diag", progress=False).fit(train)


def test_laplace_signature_is_laplace_torchs():
    import inspect

    names = list(inspect.signature(Laplace.optimize_prior_precision).parameters)
    assert names == ["self", "pred_type", "method", "n_steps", "lr", "init_prior_prec", "prior_structure",
                     "val_loader", "loss", "log_prior_prec_min", "log_prior_prec_max", "grid_size", "link_approx",
                     "n_samples", "verbose", "progress_bar", "tune_sigma_noise", "grid"]


def test_laplace_deprecated_spellings_give_the_new_spellings_results():
    model, train, val = _problem()
    new = _laplace(model, train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spellings never warn
        by_grid = new.optimize_prior_precision(method="gridsearch", val_loader=val).clone()
        by_structure = new.optimize_prior_precision(method="marglik", prior_structure="layerwise", n_steps=5).clone()
    old = _laplace(model, train)
    with pytest.warns(DeprecationWarning, match="pass method='gridsearch'"):
        torch.testing.assert_close(old.optimize_prior_precision("gridsearch", val_loader=val), by_grid, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="prior_structure='layerwise'"):
        torch.testing.assert_close(old.optimize_prior_precision(method="marglik", prior_structure="layer", n_steps=5),
                                   by_structure, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="prior_structure='diag'"):
        assert old.optimize_prior_precision(prior_structure="parameter", n_steps=1).shape == (new.n_params,)


def test_laplace_default_grid_is_logspace_minus4_4_21_and_its_bounds_are_arguments():
    model, train, val = _problem()
    la = _laplace(model, train)
    default = la.optimize_prior_precision(method="gridsearch", val_loader=val).clone()
    explicit = la.optimize_prior_precision(method="gridsearch", val_loader=val, grid=torch.logspace(-4, 4, 21))
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    narrow = la.optimize_prior_precision(method="gridsearch", val_loader=val, log_prior_prec_min=2,
                                         log_prior_prec_max=3, grid_size=2)
    assert float(narrow) in (100.0, 1000.0)


def test_method_none_is_gridsearch_with_a_val_loader_and_marglik_without():
    assert method_choice("glm", None, has_val_loader=True) == ("glm", tuning.PriorOptimization.GRIDSEARCH)
    assert method_choice("glm", None, has_val_loader=False) == ("glm", tuning.PriorOptimization.MARGLIK)
    assert method_choice("glm", "marglik", has_val_loader=True) == ("glm", tuning.PriorOptimization.MARGLIK)


def test_laplace_default_method_tunes_on_a_given_val_loader_and_marglik_is_laplace_torchs():
    model, train, val = _problem()
    la = _laplace(model, train)
    by_grid = la.optimize_prior_precision(method="gridsearch", val_loader=val).clone()
    by_default = la.optimize_prior_precision(val_loader=val).clone()
    torch.testing.assert_close(by_default, by_grid, rtol=0, atol=0)
    la.prior_precision = torch.ones(1, dtype=DTYPE)
    marglik = la.optimize_prior_precision(method="marglik", val_loader=val, n_steps=20).clone()
    la.prior_precision = torch.ones(1, dtype=DTYPE)
    torch.testing.assert_close(la.optimize_prior_precision(n_steps=20), marglik, rtol=0, atol=0)
    assert not torch.allclose(marglik, by_grid)


def test_laplace_loss_argument_replaces_the_nll():
    model, train, val = _problem()
    la = _laplace(model, train)
    seen = []

    def error_rate(probs, y):
        seen.append(probs.shape)
        return float((probs.argmax(-1) != y).double().mean())

    la.optimize_prior_precision(method="gridsearch", val_loader=val, loss=error_rate, grid=torch.tensor([0.5, 2.0]))
    assert seen == [(20, 3)] * 2


def test_laplace_and_scalla_call_the_one_implementation(monkeypatch):
    calls = []

    def spy(name):
        original = getattr(tuning, name)

        def wrapped(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        return wrapped

    evidence_names = ("maximise_evidence", "checked_sigma_noise", "checked_prior_precision")
    users = {laplace_module: ("grid_search",) + evidence_names, scalla_module: evidence_names,
             scalla_tuning_module: ("grid_search",)}  # ScaLLA's grid search lives in posthoc.scalla.tuning
    for module, names in users.items():
        for name in names:
            assert getattr(module, name) is getattr(tuning, name)
            monkeypatch.setattr(module, name, spy(name))
    for module in (laplace_module, scalla_module):
        assert module.PriorOptimization is tuning.PriorOptimization
    model, train, val = _problem()
    la = _laplace(model, train)
    la.optimize_prior_precision(method="gridsearch", val_loader=val, grid=torch.tensor([1.0]))
    la.optimize_prior_precision(method="marglik", n_steps=1)
    assert {"grid_search", "maximise_evidence", "checked_prior_precision"} <= set(calls)
    calls.clear()
    s = ScaLLA(model, "classification", n_features=4, steps=5, n_target_points=20, eigen_subsample=10,
               progress=False).fit(train)
    s.optimize_prior_precision("gridsearch", val_loader=val, grid=torch.tensor([1.0, 2.0]))
    s.optimize_prior_precision("marglik", n_steps=1)
    assert {"grid_search", "maximise_evidence", "checked_prior_precision", "checked_sigma_noise"} <= set(calls)
