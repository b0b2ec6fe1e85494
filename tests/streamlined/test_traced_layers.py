"""Conv1d, transformers' Conv1D, GroupNorm and the functional layer_norm / group_norm on the traced path.

Exact references in float64: input noise through fixed weights against J diag(v) Jᵀ (torch.func.jacrev; the norms
with linearised statistics, whose rule is that Jacobian), and weight noise on a deterministic input against
J_θ diag(Var θ) J_θᵀ over the layer's parameters (the output is linear in the weights of one layer: exact).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from streamlined.mc import assert_input_sandwich
from torch import nn
from torch.func import functional_call, jacrev

from posthoc.streamlined import Streamlined

DTYPE = torch.float64


class HFConv1DLike(nn.Module):
    """The maths of transformers' Conv1D (y = x W + b, W (D_in, D_out)); the real class is used when importable."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


def _hf_conv1d(nf: int, nx: int) -> nn.Module:
    transformers = pytest.importorskip("transformers.pytorch_utils")
    layer = transformers.Conv1D(nf, nx)
    nn.init.normal_(layer.weight, std=0.5)
    nn.init.normal_(layer.bias, std=0.1)
    return layer


class Functional(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.dtype_anchor = nn.Parameter(torch.zeros(()))  # Streamlined takes the dtype from it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


_g = torch.Generator().manual_seed(3)
GAMMA, BETA = 1 + 0.2 * torch.randn(4, dtype=DTYPE, generator=_g), 0.1 * torch.randn(4, dtype=DTYPE, generator=_g)
LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 7)),
    "conv1d_dilated_valid": (lambda: nn.Conv1d(3, 2, 2, dilation=2, padding="valid"), (3, 6)),
    "hf_conv1d": (lambda: _hf_conv1d(5, 3), (4, 3)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (4, 3)),
    "f_layer_norm": (lambda: Functional(lambda x: F.layer_norm(x, (4,), GAMMA, BETA, 1e-5)), (3, 4)),
    "f_group_norm": (lambda: Functional(lambda x: F.group_norm(x, 2, GAMMA, BETA)), (4, 5)),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    layer = LAYERS[name][0]()
    if isinstance(layer, nn.GroupNorm):
        nn.init.normal_(layer.weight, 1.0, 0.2)
        nn.init.normal_(layer.bias, 0.0, 0.1)
    return nn.Sequential(layer, nn.Flatten()).to(DTYPE).eval()


@pytest.mark.parametrize("mode", ["diagonal", "full"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_input_noise_is_the_jacobian_sandwich(name: str, mode: str) -> None:
    model = _model(name)
    x = torch.randn(3, *LAYERS[name][1], dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    input_var = torch.rand(x.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(2)) + 0.1
    pred = Streamlined(model, weight_var={}, activation_covariance=mode, layernorm="linearized").input_sensitivity(
        x, input_var)
    assert_input_sandwich(pred, model, x, input_var, mode)


@pytest.mark.parametrize("mode", ["diagonal", "full"])
@pytest.mark.parametrize("name", ["conv1d", "conv1d_dilated_valid", "hf_conv1d", "groupnorm"])
def test_weight_noise_is_the_parameter_jacobian_sandwich(name: str, mode: str) -> None:
    model = _model(name)
    x = torch.randn(2, *LAYERS[name][1], dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    params = {n: p.detach() for n, p in model.named_parameters()}
    variances = {n: torch.rand(p.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(4)) * 0.1
                 for n, p in params.items()}
    pred = Streamlined(model, weight_var=variances, activation_covariance=mode).predict(x)
    jacs = jacrev(lambda ps: functional_call(model, ps, (x,)))(params)  # name -> (B, C, *param_shape)
    for b in range(x.shape[0]):
        expected = sum((jacs[n][b].reshape(pred.mean.shape[1], -1) * variances[n].reshape(1, -1))
                       @ jacs[n][b].reshape(pred.mean.shape[1], -1).T for n in params)
        got = pred.cov[b] if mode == "full" else pred.var[b]  # diagonal mode: the marginals
        torch.testing.assert_close(got, expected if mode == "full" else torch.diagonal(expected),
                                   rtol=1e-10, atol=1e-12)


def test_hf_conv1d_rule_equals_the_linear_rule_on_its_transpose() -> None:
    """The registry key names transformers' class without importing it; the rule is Linear's with Wᵀ."""
    layer = _hf_conv1d(3, 4).to(DTYPE)
    linear = nn.Linear(4, 3).to(DTYPE)
    with torch.no_grad():
        linear.weight.copy_(layer.get_parameter("weight").T)
        linear.bias.copy_(layer.get_parameter("bias"))
    var_w = torch.rand(4, 3, dtype=DTYPE) * 0.01
    x = torch.randn(5, 2, 4, dtype=DTYPE)
    got = Streamlined(nn.Sequential(layer, nn.Flatten()), weight_var={"0.weight": var_w}).predict(x)
    expected = Streamlined(nn.Sequential(linear, nn.Flatten()), weight_var={"0.weight": var_w.T}).predict(x)
    torch.testing.assert_close(got.var, expected.var, rtol=1e-12, atol=0)
