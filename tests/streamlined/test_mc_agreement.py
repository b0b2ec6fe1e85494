"""Each propagation rule against Monte Carlo of the same model and weight posterior (float64,
20,000 samples). Tolerances come from the MC standard error where the rule is exact, and from
the contract (full mode within 10 % of the MC output variance at small posterior variance)
where it linearises. The diagonal mode's error is asserted within a band around the measured
value, so a change in it fails loudly rather than hiding under a loose tolerance."""

from __future__ import annotations

import pytest
import torch
from references import small_cnn
from streamlined.mc import laplace_sampler, mc_moments, mean_field_sampler, total_ratio
from torch import nn

from posthoc.laplace import Laplace
from posthoc.models.resnet import ResidualBlock
from posthoc.models.vit import MultiHeadSelfAttention, SmallViT
from posthoc.streamlined import Streamlined

DTYPE = torch.float64
PRIOR = 1000.0  # small posterior variance: the regime where linearisation is meant to hold
Z_MAX = 4.5  # per-entry |z| bound for exact rules: with ~20 entries, P(any |z| > 4.5) < 1e-4


def _data(n: int, shape: tuple[int, ...], n_classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=DTYPE)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return x, [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


def _fit(model, loader, structure, prior):
    return Laplace(model, "classification", "all", structure, prior_precision=prior, progress=False).fit(loader)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize("mode", ["diagonal", "full"])
def test_single_linear_is_exact(structure, mode):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DTYPE)
    x, loader = _data(64, (4,))
    la = _fit(model, loader, structure, prior=2.0)
    x = x[:6]
    ref = mc_moments(model, x, laplace_sampler(la), input_std=0.3)
    pred = Streamlined(model, posterior=la, activation_covariance=mode).predict(x, input_var=0.09)
    z = (pred.var - ref.var) / ref.var_se
    assert float(z.abs().max()) < Z_MAX
    mean_se = (ref.var / 20_000).sqrt()
    assert float(((pred.mean - ref.mean) / mean_se).abs().max()) < Z_MAX
    assert pred.has_full_cov  # a final Linear gives (B, C, C) in both modes


def test_single_linear_mean_field_exact():
    torch.manual_seed(1)
    model = nn.Linear(5, 2).to(DTYPE)
    variances = {"weight": 0.05 * torch.rand(2, 5, dtype=DTYPE), "bias": 0.02 * torch.rand(2, dtype=DTYPE)}
    x = torch.randn(6, 5, dtype=DTYPE)
    ref = mc_moments(model, x, mean_field_sampler(model, variances), input_std=0.2)
    pred = Streamlined(model, weight_var=variances).predict(x, input_var=0.04)
    assert float(((pred.var - ref.var) / ref.var_se).abs().max()) < Z_MAX



@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_hidden_linear_diagonal_rule_is_exact(structure):
    """A Linear that is not the last layer takes the per-unit variance path (the last layer's
    (B, C, C) path is tested above); with independent input noise its marginals are exact."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3), nn.Identity()).to(DTYPE)
    x, loader = _data(64, (4,))
    la = _fit(model, loader, structure, prior=2.0)
    x = x[:6]
    ref = mc_moments(model, x, laplace_sampler(la), input_std=0.3)
    pred = Streamlined(model, posterior=la).predict(x, input_var=0.09)
    assert not pred.has_full_cov
    assert float(((pred.var - ref.var) / ref.var_se).abs().max()) < Z_MAX


def test_layernorm_random_affine_is_exact_on_fixed_inputs():
    """y = γ n(x) + β with independent random γ, β: Var y = Var(γ) n² + Var(β), for both rules."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.LayerNorm(5), nn.Identity()).to(DTYPE)
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5), model[0].bias.normal_()
    variances = {"0.weight": 0.05 * torch.rand(5, dtype=DTYPE), "0.bias": 0.02 * torch.rand(5, dtype=DTYPE)}
    x = torch.randn(6, 5, dtype=DTYPE)
    ref = mc_moments(model, x, mean_field_sampler(model, variances))
    for rule in ("frozen", "linearized"):
        pred = Streamlined(model, weight_var=variances, layernorm=rule).predict(x)
        assert float(((pred.var - ref.var) / ref.var_se).abs().max()) < Z_MAX


def _mlp(activation: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 24), activation(), nn.Linear(24, 24), activation(), nn.Linear(24, 3)).to(DTYPE)


# measured diagonal-mode ratios Σvar / Σvar_MC (see the report): asserted within ±0.03
DIAGONAL_MODE_MLP = {("relu", "diag"): 1.068, ("relu", "kron"): 1.065, ("tanh", "diag"): 1.055, ("tanh", "kron"): 1.056}


def _mode_ratios(model: nn.Module, x: torch.Tensor, la: Laplace):
    """Total output variance / MC for the full and the diagonal mode on the first 8 inputs, and the MC reference."""
    x = x[:8]
    ref = mc_moments(model, x, laplace_sampler(la))
    full = Streamlined(model, posterior=la, activation_covariance="full").predict(x)
    diagonal = Streamlined(model, posterior=la).predict(x)
    return total_ratio(full.var, ref), total_ratio(diagonal.var, ref), ref


@pytest.mark.parametrize(("activation", "structure"), [("relu", "diag"), ("tanh", "kron")])
def test_mlp_full_mode_within_10_percent(activation, structure, record):
    model = _mlp({"relu": nn.ReLU, "tanh": nn.Tanh}[activation])
    x, loader = _data(256, (5,), seed=1)
    r_full, r_diag, ref = _mode_ratios(model, x, _fit(model, loader, structure, prior=PRIOR))
    record(f"MLP 5-24-24-3 {activation}, LA {structure}", full=r_full, diagonal=r_diag, mc_se=ref.total_var_se_rel)
    assert abs(r_full - 1) < 0.10 + 3 * ref.total_var_se_rel
    assert abs(r_diag - DIAGONAL_MODE_MLP[(activation, structure)]) < 0.03


DIAGONAL_MODE_CNN = {"diag": 1.089, "kron": 1.085}


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_cnn_full_mode_within_10_percent(structure, record):
    model = small_cnn(n_out=3, seed=0)  # conv-relu-maxpool-conv-tanh-fc on 6x6 inputs
    x, loader = _data(256, (1, 6, 6), seed=2)
    r_full, r_diag, ref = _mode_ratios(model, x, _fit(model, loader, structure, prior=PRIOR))
    record(f"CNN conv-relu-maxpool-conv-tanh-fc (6x6), LA {structure}", full=r_full, diagonal=r_diag,
           mc_se=ref.total_var_se_rel)
    assert abs(r_full - 1) < 0.10 + 3 * ref.total_var_se_rel
    assert abs(r_diag - DIAGONAL_MODE_CNN[structure]) < 0.03


def _attention_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(MultiHeadSelfAttention(8, 2), nn.Flatten()).to(DTYPE)


def _tokens(correlated: bool, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if correlated:  # one shared token plus small per-token deviations
        return torch.randn(4, 1, 8, generator=g, dtype=DTYPE) + 0.1 * torch.randn(4, 6, 8, generator=g, dtype=DTYPE)
    return torch.randn(4, 6, 8, generator=g, dtype=DTYPE)


ATTENTION_INDEPENDENT = {True: 0.534, False: 0.885}  # measured Σvar / Σvar_MC of the authors' rule


@pytest.mark.parametrize("correlated", [True, False])
def test_attention_rules(correlated, record):
    """Random W_v and W_out (Q, K deterministic): full mode and the shared-value rule are exact;
    the token-independent rule under-estimates, badly for correlated tokens."""
    model = _attention_model()
    attn = model[0]
    variances = {"0.v_proj.weight": torch.full_like(attn.v_proj.weight, 0.02),
                 "0.v_proj.bias": torch.full_like(attn.v_proj.bias, 0.01),
                 "0.out_proj.weight": torch.full_like(attn.out_proj.weight, 0.02)}
    x = _tokens(correlated)
    ref = mc_moments(model, x, mean_field_sampler(model, variances))
    ratios = {}
    for name, kwargs in {"independent": {}, "shared_value": {"attention": "shared_value"},
                         "full": {"activation_covariance": "full"}}.items():
        pred = Streamlined(model, weight_var=variances, **kwargs).predict(x)
        ratios[name] = total_ratio(pred.var, ref)
        if name != "independent":
            assert float(((pred.var - ref.var) / ref.var_se).abs().max()) < Z_MAX, name
    record(f"attention, {'correlated' if correlated else 'independent'} tokens, Q/K deterministic", **ratios,
           mc_se=ref.total_var_se_rel)
    assert abs(ratios["independent"] - ATTENTION_INDEPENDENT[correlated]) < 0.03


def test_attention_with_random_query_key(record):
    """All four projections random: the Q, K-deterministic approximation's error, reported."""
    model = _attention_model()
    variances = {n: torch.full_like(p, 0.01) for n, p in model.named_parameters()}
    out = {}
    for correlated in (True, False):
        x = _tokens(correlated)
        ref = mc_moments(model, x, mean_field_sampler(model, variances))
        for name, kwargs in {"independent": {}, "shared_value": {"attention": "shared_value"},
                             "full": {"activation_covariance": "full"}}.items():
            pred = Streamlined(model, weight_var=variances, **kwargs).predict(x)
            out[f"{'corr' if correlated else 'indep'}_{name}"] = total_ratio(pred.var, ref)
    record("attention, all projections random (var 0.01)", **out)
    assert abs(out["corr_full"] - 1) < 0.15 and abs(out["indep_full"] - 1) < 0.15


def test_vit_full_mode(record):
    torch.manual_seed(0)
    model = SmallViT(image_size=8, patch_size=4, dim=8, depth=1, n_heads=2, mlp_ratio=2, n_classes=3).to(DTYPE).eval()
    variances = {n: torch.full_like(p, 2e-3) for n, p in model.named_parameters()
                 if not n.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias"))}
    x = torch.randn(6, 1, 8, 8, dtype=DTYPE)
    ref = mc_moments(model, x, mean_field_sampler(model, variances))
    ratios = {}
    for name, kwargs in {"full_linearized_ln": {"activation_covariance": "full"},
                         "full_frozen_ln": {"activation_covariance": "full", "layernorm": "frozen"},
                         "diagonal_frozen_ln": {}, "diagonal_linearized_ln": {"layernorm": "linearized"},
                         "diagonal_shared_value": {"attention": "shared_value"}}.items():
        ratios[name] = total_ratio(Streamlined(model, weight_var=variances, **kwargs).predict(x).var, ref)
    record("SmallViT (8x8, dim 8, 1 block), mean-field var 2e-3 except Q/K", **ratios, mc_se=ref.total_var_se_rel)
    # measured 1.18 at this variance: LayerNorm over only 8 features is strongly nonlinear, so the
    # 10 % goal is not met here (reported); the linearised LayerNorm must beat the frozen one.
    assert abs(ratios["full_linearized_ln"] - 1.179) < 0.03
    assert abs(ratios["full_linearized_ln"] - 1) < abs(ratios["full_frozen_ln"] - 1)


def test_residual_full_mode(record):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), ResidualBlock(2, 2), ResidualBlock(2, 3, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)).to(DTYPE)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    variances = {n: torch.full_like(p, 2e-3) for n, p in model.named_parameters()}
    x = torch.randn(6, 1, 6, 6, dtype=DTYPE)
    ref = mc_moments(model, x, mean_field_sampler(model, variances))
    full = Streamlined(model, weight_var=variances, activation_covariance="full").predict(x)
    diagonal = Streamlined(model, weight_var=variances).predict(x)
    ratios = {"full": total_ratio(full.var, ref), "diagonal": total_ratio(diagonal.var, ref)}
    record("residual CNN (2 ResidualBlocks, BN eval, 6x6), mean-field var 2e-3", **ratios,
           mc_se=ref.total_var_se_rel)
    assert abs(ratios["full"] - 1) < 0.10
