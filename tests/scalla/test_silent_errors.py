"""ScaLLA never answers silently for weights other than those it was fitted at, is reproducible under a fixed seed
whatever the global RNG, and names the expected input shape (issue 20). Small float64 MLPs, a few steps each."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from posthoc import ScaLLA

DTYPE = torch.float64
FAST = dict(n_features=4, steps=30, n_target_points=40, eigen_subsample=20, lr=1e-2, progress=False, seed=0)


def _data() -> tuple[torch.Tensor, torch.Tensor, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g, dtype=DTYPE)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y, DataLoader(TensorDataset(x, y), batch_size=20)


def _mlp(seed: int, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 16), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [
        nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).to(DTYPE).eval()


def _other_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {k: 2 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in model.state_dict().items()}


def test_theta_star_is_the_weights_at_fit():
    """Built, then the weights loaded, then fit: the same kernel and covariance as built after the load (on
    83bdd0f the surrogate targets used the weights at construction: kernel 96% and covariance 76% off)."""
    x, _, loader = _data()
    model = _mlp(1)
    early = ScaLLA(model, "classification", **FAST)
    model.load_state_dict(_other_weights(model))
    early.fit(loader)
    late = ScaLLA(model, "classification", **FAST).fit(loader)
    torch.testing.assert_close(early.kernel(x[:10], x[:10]), late.kernel(x[:10], x[:10]), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(early.predict(x[:10]).cov, late.predict(x[:10]).cov, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(early.log_marginal_likelihood(), late.log_marginal_likelihood(), rtol=1e-12, atol=0.0)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(early.posterior.theta_sq_norm, theta.square().sum(), rtol=1e-12, atol=0.0)


def test_changed_weights_after_fit_raise_until_restored_or_refitted():
    x, _, loader = _data()
    model = _mlp(1)
    s = ScaLLA(model, "classification", **FAST).fit(loader)
    before = s.predict(x[:5]).cov
    fitted_weights = copy.deepcopy(model.state_dict())
    model.load_state_dict(_other_weights(model))
    for call in (lambda: s.predict(x[:5]), lambda: s(x[:5]), lambda: s.features(x[:5]),
                 lambda: s.kernel(x[:5], x[:5]), lambda: s.log_marginal_likelihood(),
                 lambda: s.optimize_prior_precision("gridsearch", val_loader=loader),
                 lambda: s.fit_posterior(loader)):
        with pytest.raises(RuntimeError, match="changed since fit"):
            call()
    model.load_state_dict(fitted_weights)  # the same values again: accepted
    assert torch.equal(s.predict(x[:5]).cov, before)
    with torch.no_grad():
        model[0].weight.add_(1e-3)  # an in-place optimizer-like step
    with pytest.raises(RuntimeError, match="changed since fit"):
        s.predict(x[:5])
    s.fit(loader)  # refitting at the new weights clears it
    s.predict(x[:5])


def test_load_state_dict_checks_the_current_weights():
    """A state fitted at W loads into a ScaLLA built while the model had other weights, once W is back; a ScaLLA
    built at W refuses the state once the model holds other weights (83bdd0f compared with the weights at
    construction: the first raised, the second loaded and predicted at the wrong weights)."""
    x, _, loader = _data()
    model = _mlp(1)
    fitted_weights = copy.deepcopy(model.state_dict())
    s = ScaLLA(model, "classification", **FAST).fit(loader)
    state, expected = s.state_dict(), s.predict(x[:5]).cov

    model.load_state_dict(_other_weights(model))
    built_elsewhere = ScaLLA(model, "classification", **FAST)
    model.load_state_dict(fitted_weights)
    torch.testing.assert_close(built_elsewhere.load_state_dict(state).predict(x[:5]).cov, expected,
                               rtol=1e-12, atol=0.0)

    built_here = ScaLLA(model, "classification", **FAST)
    model.load_state_dict(_other_weights(model))
    with pytest.raises(ValueError, match="weights differ from those the state was fitted at"):
        built_here.load_state_dict(state)
    with pytest.raises(ValueError, match="weights differ from those the state was fitted at"):
        s.load_state_dict(state)
    with pytest.raises(RuntimeError, match="changed since fit"):  # the refused load left s guarded
        s.predict(x[:5])


@pytest.mark.parametrize("user_surrogate", [False, True])
def test_same_seed_same_kernel_whatever_the_global_rng(user_surrogate):
    """Dropout in the trunk (copied by the default surrogate) or in a user's surrogate drew its masks from the
    global RNG in training: on 83bdd0f two fits with seed=0 gave kernels 4.8% apart (default surrogate)."""
    x, _, loader = _data()
    model = _mlp(1, dropout=0.3)
    kernels = []
    for global_seed in (0, 123):
        surrogate = None
        if user_surrogate:
            torch.manual_seed(7)
            surrogate = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 4 * 3)).to(DTYPE)
        torch.manual_seed(global_seed)
        s = ScaLLA(model, "classification", surrogate=surrogate, **FAST).fit(loader)
        kernels.append(s.kernel(x[:8], x[:8]))
    assert torch.equal(kernels[0], kernels[1])
    assert not s.surrogate.training  # and it is the eval-mode map that was trained


def test_inputs_of_another_shape_name_the_expected_shape():
    x, y, loader = _data()
    s = ScaLLA(_mlp(1), "classification", **FAST).fit(loader)
    wrong = DataLoader(TensorDataset(x[:, None, :], y), batch_size=20)
    expected = r"must have shape \(B, 3\), the shape of the inputs ScaLLA was fitted on; got \(20, 1, 3\)"
    with pytest.raises(ValueError, match=expected):
        s.fit_posterior(wrong)
    with pytest.raises(ValueError, match=expected):
        s.optimize_prior_precision("gridsearch", val_loader=wrong)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3\)"):
        s.predict(x[:4, None])


def test_network_in_train_mode_is_evaluated_in_eval_mode_and_left_as_found():
    """predict's mean is the eval-mode network's output even if the caller left the model in train mode (on
    83bdd0f a model put back in train mode after fit gave a Dropout-sampled mean, different on every call), and
    fit / predict leave the caller's train/eval flags as they were (83bdd0f switched the model to eval)."""
    x, _, loader = _data()
    model = _mlp(1, dropout=0.5).train()
    model[0].eval()  # mixed flags must come back as they were
    flags = [m.training for m in model.modules()]
    s = ScaLLA(model, "classification", **FAST).fit(loader)
    assert [m.training for m in model.modules()] == flags
    first, second = s.predict(x[:8]), s.predict(x[:8])
    assert [m.training for m in model.modules()] == flags
    reference = copy.deepcopy(model).eval()(x[:8]).detach()
    assert torch.equal(first.mean, reference) and torch.equal(second.mean, reference)
    assert torch.equal(first.cov, second.cov)


def test_a_failed_or_interrupted_refit_leaves_nothing_to_predict_with():
    """fit reads theta* first: a refit that then fails must not leave the previous posterior looking current."""
    x, y, loader = _data()
    model = _mlp(1)
    s = ScaLLA(model, "classification", **FAST).fit(loader)
    model.load_state_dict(_other_weights(model))
    bad_context = DataLoader(TensorDataset(x[:, :2]), batch_size=20)
    with pytest.raises(ValueError, match="context inputs have shape"):
        s.fit(loader, context_loader=bad_context)
    for call in (lambda: s.predict(x[:5]), lambda: s.kernel(x[:5], x[:5]), lambda: s.features(x[:5])):
        with pytest.raises(RuntimeError, match="not fitted"):
            call()

    class Stop(Exception):
        pass

    def stop(step: int, _: int) -> None:
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        s.fit(loader, callback=stop)
    with pytest.raises(RuntimeError, match="not fitted"):  # a half-trained surrogate is not a kernel
        s.kernel(x[:5], x[:5])


@pytest.mark.parametrize("loader_kwargs, expected", [
    (dict(batch_size=3), list(range(10))),
    (dict(batch_size=3, drop_last=True), list(range(9))),
    (dict(batch_size=3, sampler=torch.utils.data.SubsetRandomSampler([1, 4, 7, 8])), [1, 4, 7, 8]),
])
def test_input_pool_holds_what_the_loader_yields(loader_kwargs, expected):
    """On 83bdd0f a loader over a TensorDataset gave the pool the whole tensor whatever its sampler: a subset
    sampler (e.g. a train split of a larger dataset) trained the surrogate on examples outside the loader."""
    from torch.utils.data import DataLoader, TensorDataset

    from posthoc.scalla.training import InputPool

    x = torch.arange(10, dtype=torch.float64).reshape(10, 1)
    pool = InputPool(DataLoader(TensorDataset(x, x), **loader_kwargs), "train", torch.float64, torch.device("cpu"))
    assert sorted(pool.inputs.reshape(-1).long().tolist()) == expected
