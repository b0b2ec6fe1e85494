"""The diagonal mode's fused variance paths equal the full mode's exact moments on single layers (float64).

With diagonal input noise and one layer, the full mode's output covariance (the layer's Jacobian sandwich plus the
weight-noise covariance) has the exact variances on its diagonal, computed by other code (``jac``, ``noise_full``):
the diagonal mode's variances (BatchNorm's one-factor product, LayerNorm's fused normalisation, ReLU's 0/1 mask,
the last Linear's diagonal-noise shortcut) must match them to rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from posthoc.streamlined import Streamlined

DTYPE = torch.float64


def _random_variances(model: nn.Module, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {name: scale * torch.rand(p.shape, generator=gen, dtype=DTYPE) for name, p in model.named_parameters()}


def _batchnorm(cls: type[nn.Module], features: int) -> nn.Module:
    bn = cls(features).to(DTYPE)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return bn


CASES = {
    "batchnorm2d": (lambda: nn.Sequential(_batchnorm(nn.BatchNorm2d, 3), nn.Flatten()), (3, 2, 2), {}),
    "batchnorm1d": (lambda: nn.Sequential(_batchnorm(nn.BatchNorm1d, 5), nn.Identity()), (5,), {}),
    "layernorm_frozen": (lambda: nn.Sequential(nn.LayerNorm(6), nn.Identity()), (6,), {"layernorm": "frozen"}),
    "layernorm_linearized": (lambda: nn.Sequential(nn.LayerNorm(6), nn.Identity()), (6,),
                             {"layernorm": "linearized"}),
    "groupnorm": (lambda: nn.Sequential(nn.GroupNorm(2, 4), nn.Flatten()), (4, 3), {"layernorm": "linearized"}),
    "relu": (lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Identity()), (5,), {}),
    "gelu": (lambda: nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Identity()), (5,), {}),
    "gelu_tanh": (lambda: nn.Sequential(nn.Linear(5, 7), nn.GELU(approximate="tanh"), nn.Identity()), (5,), {}),
    "silu": (lambda: nn.Sequential(nn.Linear(5, 7), nn.SiLU(), nn.Identity()), (5,), {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_diagonal_mode_variances_equal_the_full_modes_on_one_layer(name: str) -> None:
    build, shape, options = CASES[name]
    torch.manual_seed(0)
    model = build().to(DTYPE).eval()
    variances = _random_variances(model)
    x = torch.randn(4, *shape, dtype=DTYPE)
    input_var = 0.3 * torch.rand(4, *shape, dtype=DTYPE)
    diagonal = Streamlined(model, weight_var=variances, **options).predict(x, input_var=input_var)
    full = Streamlined(model, weight_var=variances, activation_covariance="full", **options).predict(
        x, input_var=input_var)
    assert not diagonal.has_full_cov
    torch.testing.assert_close(diagonal.mean, full.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(diagonal.var, torch.diagonal(full.cov, dim1=-2, dim2=-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_input_var", [True, False])
def test_last_linear_output_covariance_with_a_diagonal_posterior_equals_the_full_modes(bias: bool,
                                                                                       with_input_var: bool) -> None:
    """The last Linear's (B, C, C) covariance: W̄ diag(var) W̄ᵀ plus the diagonal weight/bias noise on its diagonal."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5, bias=bias)).to(DTYPE)
    variances = _random_variances(model)
    x = torch.randn(3, 6, dtype=DTYPE)
    input_var = 0.2 * torch.rand(3, 6, dtype=DTYPE) if with_input_var else None
    diagonal = Streamlined(model, weight_var=variances).predict(x, input_var=input_var)
    full = Streamlined(model, weight_var=variances, activation_covariance="full").predict(x, input_var=input_var)
    assert diagonal.has_full_cov
    torch.testing.assert_close(diagonal.cov, full.cov, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diagonal.cov, diagonal.cov.transpose(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=3, dilation=2, padding=2), dict(kernel_size=(2, 3), stride=(1, 2)),
                                  dict(kernel_size=1, stride=2)])
def test_conv_full_mode_reads_only_same_feature_covariances_with_diagonal_weight_noise(conv: dict,
                                                                                         monkeypatch) -> None:
    """A Conv2d with diagonal weight noise after a random layer: the same-feature slices of the input covariance
    give the same full-mode output as the (L·K)² covariance of the unfolded patches (the path Kronecker noise
    takes), forced here by reporting that the noise needs cross-feature covariances."""
    from posthoc.streamlined.rules.affine import AffineNoise
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, **conv), nn.Flatten()).to(DTYPE)
    variances = _random_variances(model)
    x = torch.randn(2, 2, 6, 7, dtype=DTYPE)
    fast = Streamlined(model, weight_var=variances, activation_covariance="full").predict(x, input_var=0.1)
    monkeypatch.setattr(AffineNoise, "needs_cross_feature_cov", lambda self: True)
    patches = Streamlined(model, weight_var=variances, activation_covariance="full").predict(x, input_var=0.1)
    torch.testing.assert_close(fast.cov, patches.cov, rtol=1e-10, atol=1e-14)
    assert float(torch.diagonal(fast.cov, dim1=1, dim2=2).min()) > 0


def test_full_mode_width_limit_applies_to_layers_that_carry_covariance_only() -> None:
    """Layers before the first random weight are deterministic: a wide one passes in the full mode (it was refused
    by max_full_dim); the output is that of the random tail alone, and a wide random layer is still refused."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE).eval()
    tail = model[5:]
    variances = {name: v for name, v in _random_variances(model).items() if name.startswith(("5.", "7."))}
    x = torch.randn(3, 2, 6, 6, dtype=DTYPE)
    full = Streamlined(model, weight_var=variances, activation_covariance="full", max_full_dim=40).predict(x)
    with torch.no_grad():
        features = model[:5](x)
    expected = Streamlined(tail, weight_var=variances, activation_covariance="full").predict(features)  # same names
    torch.testing.assert_close(full.mean, model(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(full.cov, expected.cov, rtol=1e-12, atol=1e-14)
    variances["0.weight"] = torch.full_like(model[0].weight, 1e-3)  # the 288-wide conv output is random now
    with pytest.raises(MemoryError, match="288 x 288 .* above max_full_dim=40"):
        Streamlined(model, weight_var=variances, activation_covariance="full", max_full_dim=40).predict(x)


@pytest.mark.parametrize("random", ["weight and bias", "weight only", "no bias", "deterministic head"])
def test_last_linear_one_product_covariance_equals_the_unfused_route(random: str, monkeypatch) -> None:
    """Few classes: the last Linear's covariance from one product with a cached matrix (LinearStep._fused_cov) equals
    the three-pass route, also after the head's weights and variances change in place (the cache follows them)."""
    from posthoc.streamlined.rules import affine

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3, bias=random != "no bias")).to(DTYPE)
    variances = _random_variances(model)
    if random == "weight only":
        variances.pop("2.bias")
    if random == "deterministic head":
        variances = {name: v for name, v in variances.items() if name.startswith("0.")}
    x = torch.randn(5, 4, dtype=DTYPE)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        fused = Streamlined(model, weight_var=variances).predict(x).cov
        with monkeypatch.context() as patch:
            patch.setattr(affine, "FUSED_COV_MAX", 0)
            return fused, Streamlined(model, weight_var=variances).predict(x).cov

    sp = Streamlined(model, weight_var=variances)
    for change in ("weights", "variances", None):
        fused, unfused = both()
        torch.testing.assert_close(fused, unfused, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(sp.predict(x).cov, unfused, rtol=1e-12, atol=1e-14)  # one object, cached
        with torch.no_grad():
            if change == "weights":
                model[2].weight.mul_(1.7)
            for name in variances if change == "variances" else ():
                variances[name].mul_(2.5)


@pytest.mark.parametrize("layout", ["contiguous", "channels-last conv variances"])
def test_layer_noise_cache_follows_variances_changed_in_place(layout: str) -> None:
    """The per-layer noise view built once per posterior (affine._NOISE) never serves stale variances: after an
    in-place change of the user's weight_var tensors (channels-last conv variances too, whose (C, K) reshape is a
    copy), the same Streamlined object predicts what a fresh one does."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(),
                          nn.Linear(16, 3)).to(DTYPE)
    variances = _random_variances(model)
    if layout != "contiguous":
        variances = {name: v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) if v.ndim == 4 else v
                     for name, v in variances.items()}
        assert not variances["2.weight"].is_contiguous()
    x = torch.randn(5, 2, 4, 4, dtype=DTYPE)
    sp = Streamlined(model, weight_var=variances)
    sp.predict(x)
    with torch.no_grad():
        for v in variances.values():
            v.mul_(3.0)
    fresh = Streamlined(model, weight_var={name: v.clone() for name, v in variances.items()}).predict(x)
    torch.testing.assert_close(sp.predict(x).cov, fresh.cov, rtol=1e-12, atol=1e-15)
