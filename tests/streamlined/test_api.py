"""Streamlined API: errors, walking, input sensitivity, variance scale, bench registration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from posthoc import Streamlined
from posthoc.models import FMNISTCNN, SmallResNet, SmallViT
from posthoc.streamlined import UnsupportedLayerError, register_rule

DTYPE = torch.float64


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(DTYPE)


def _variances(model: nn.Module, value: float = 1e-3) -> dict[str, torch.Tensor]:
    return {n: torch.full_like(p, value) for n, p in model.named_parameters()}


def test_unsupported_layer_names_it_and_the_supported_list():
    model = nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 2)).to(DTYPE)
    sp = Streamlined(model, weight_var=_variances(model))
    with pytest.raises(UnsupportedLayerError, match="Softplus.*Linear"):
        sp.predict(torch.randn(2, 3, dtype=DTYPE))


def test_non_chain_forward_is_propagated_as_written():
    """A forward that is not the chain of the children (here an nn.Sequential subclass) goes through its traced graph."""
    class Skip(nn.Sequential):
        def forward(self, x):
            return self[1](x + self[0](x))

    model = Skip(nn.Linear(3, 3), nn.Linear(3, 2)).to(DTYPE)
    x = torch.randn(2, 3, dtype=DTYPE)
    torch.testing.assert_close(Streamlined(model, weight_var=_variances(model)).predict(x).mean, model(x))


def test_a_rule_that_does_not_reproduce_the_forward_is_caught():
    from posthoc.streamlined import RULES
    from posthoc.streamlined.rules import rule_key

    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    register_rule(Double)(lambda module, state, ctx, last: state)  # wrong: the identity
    try:
        model = nn.Sequential(nn.Linear(3, 2), Double()).to(DTYPE)
        with pytest.raises(ValueError, match="differs from model.*register_rule"):
            Streamlined(model, weight_var=_variances(model)).predict(torch.randn(2, 3, dtype=DTYPE))
    finally:
        del RULES[rule_key(Double)]


@pytest.mark.parametrize("factory", [lambda: FMNISTCNN(), lambda: SmallResNet(),
                                     lambda: SmallViT(image_size=28, patch_size=7, dim=16, depth=1, n_heads=2)])
def test_library_models_mean_is_the_forward_pass(factory):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.rand(3, 1, 28, 28)
    pred = Streamlined(model, weight_var=_variances(model, 1e-4)).predict(x)
    torch.testing.assert_close(pred.mean, model(x), rtol=1e-4, atol=1e-4)
    assert pred.has_full_cov and bool((pred.var > 0).all())


def test_input_sensitivity_is_the_linearised_input_covariance():
    model = _mlp()
    x = torch.randn(4, 3, dtype=DTYPE)
    sp = Streamlined(model, weight_var=_variances(model), activation_covariance="full")
    pred = sp.input_sensitivity(x, 0.01)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0))[0], x[i])
        torch.testing.assert_close(pred.cov[i], 0.01 * jac @ jac.T)


def test_weight_var_as_vector_matches_dict_and_deterministic_weights_give_zero():
    model = _mlp()
    variances = _variances(model)
    vector = torch.cat([v.reshape(-1) for v in variances.values()])
    x = torch.randn(4, 3, dtype=DTYPE)
    a = Streamlined(model, weight_var=variances).predict(x)
    b = Streamlined(model, weight_var=vector).predict(x)
    torch.testing.assert_close(a.cov, b.cov)
    zero = Streamlined(model, weight_var={}).predict(x)
    assert float(zero.var.abs().max()) == 0.0


def test_weight_mean_is_used_and_model_left_untouched():
    model = _mlp()
    before = [p.clone() for p in model.parameters()]
    means = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    sp = Streamlined(model, weight_mean=means, weight_var=_variances(model))
    x = torch.randn(2, 3, dtype=DTYPE)
    assert not torch.allclose(sp.predict(x).mean, model(x))
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_fit_variance_scale_lowers_validation_nll():
    from posthoc.metrics import nll
    model = _mlp()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g, dtype=DTYPE)
    y = torch.randint(0, 2, (64,), generator=g)
    sp = Streamlined(model, weight_var=_variances(model, 0.5))
    before = nll(sp.predict(x).probs(), y)
    scale = sp.fit_variance_scale([(x, y)])
    assert scale > 0 and nll(sp.predict(x).probs(), y) <= before + 1e-12


def test_bad_options():
    model = _mlp()
    with pytest.raises(ValueError, match="activation_covariance"):
        Streamlined(model, weight_var=_variances(model), activation_covariance="dense")
    with pytest.raises(ValueError, match="weight_var"):
        Streamlined(model)
    with pytest.raises(ValueError, match="shape"):
        Streamlined(model, weight_var={"0.weight": torch.ones(2, 2, dtype=DTYPE)})
    with pytest.raises(MemoryError, match="max_full_dim"):
        Streamlined(model, weight_var=_variances(model), activation_covariance="full",
                    max_full_dim=4).predict(torch.randn(2, 3, dtype=DTYPE))


def test_bench_methods_registered():
    from posthoc.bench import METHODS
    for name in ("la_diag_nn", "la_kron_nn", "streamlined_diag", "streamlined_kron"):
        assert name in METHODS
    assert METHODS["la_diag_nn"].link_approx.value == "mc"


@pytest.mark.parametrize("module", [nn.ReLU(), nn.Tanh(), nn.Sigmoid(), nn.SiLU(), nn.GELU(), nn.GELU("tanh")],
                         ids=["relu", "tanh", "sigmoid", "silu", "gelu", "gelu_tanh"])
def test_activation_slopes_equal_autograd(module):
    # the linearisation every activation rule uses: its value must be the module's and its slope the exact
    # derivative (float64)
    from posthoc.streamlined.rules.activations import _value_and_slope

    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    ref = torch.func.vmap(torch.func.grad(lambda t: module(t)))(x)
    value, slope = _value_and_slope(module, x.clone())
    torch.testing.assert_close(value, module(x), rtol=0, atol=0)
    torch.testing.assert_close(slope.to(x.dtype), ref, rtol=1e-12, atol=1e-12)
