"""One Conv2d-support decision for KFAC, the per-layer Jacobian routes and streamlined's affine rule (float64).

For a table of Conv2d configurations the three paths agree on whether they read the layer as unfolded patches
times its weight (curvature.layers.layer_kind), and each is checked against a dense reference: where the layer
is supported, EKFAC's eigenvalues are diag(Qᵀ H Q) of the exact GGN block in the fitted basis (true for any data
only if the patches and output gradients are right), the per-layer diagonal equals the dense GGN diagonal, and
the streamlined rule's convolution with the shared padding reproduces the module's output; where it is not,
KFAC's fallback and the generic Jacobian route are the exact diagonal and streamlined refuses the layer.
"""

import pytest
import torch
import torch.nn.functional as F
from references import DTYPE, dense_ggn
from torch import nn

from posthoc.curvature.jacobians import _covered_layers, factor_gradient_squares
from posthoc.curvature.kfac import candidate_layers
from posthoc.curvature.layers import LayerKind, conv_padding, layer_kind, patches
from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.structures.ekfac import EKFACCurvature
from posthoc.network.subset import ParameterSubset
from posthoc.streamlined.rules.affine import _conv_padding
from posthoc.streamlined.rules.base import UnsupportedLayerError

# (Conv2d keyword arguments, supported)
CONFIGS = [
    (dict(kernel_size=3, padding=1), True),
    (dict(kernel_size=3, padding=(1, 0), stride=2), True),
    (dict(kernel_size=(3, 2), padding=(2, 0), dilation=(2, 1), stride=(1, 2)), True),
    (dict(kernel_size=3, padding="valid"), True),
    (dict(kernel_size=3, padding="same"), True),
    (dict(kernel_size=3, padding="same", dilation=2), True),
    (dict(kernel_size=2, padding="same", dilation=2), True),  # dilation·(k − 1) = 2: symmetric
    (dict(kernel_size=2, padding="same"), False),  # one pixel on one side only
    (dict(kernel_size=(3, 2), padding="same"), False),
    (dict(kernel_size=3, padding=1, groups=2), False),
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), False),
    (dict(kernel_size=3, padding=1, padding_mode="circular"), False),
    (dict(kernel_size=3, padding=0, padding_mode="replicate"), False),
]
IDS = [f"{'ok' if ok else 'no'}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for kw, ok in CONFIGS]


def _model(conv_kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, **conv_kwargs)
    with torch.no_grad():
        n_out = conv(torch.zeros(1, 2, 5, 5)).numel()
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n_out, 3)).to(DTYPE).eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(6, 2, 5, 5, generator=g, dtype=DTYPE), torch.randint(0, 3, (6,), generator=g)


@pytest.mark.parametrize(("conv_kwargs", "supported"), CONFIGS, ids=IDS)
def test_three_paths_agree_and_match_dense_references(conv_kwargs, supported):
    model = _model(conv_kwargs)
    conv = model[0]
    x, y = _data()
    subset = ParameterSubset(model, "all")
    assert (layer_kind(conv) is LayerKind.CONV2D) is supported
    # KFAC's candidates, the per-layer Jacobian route and streamlined's rule all follow the one decision
    assert ("0" in {layer.name for layer in candidate_layers(subset)}) is supported
    assert (_covered_layers(subset) is not None) is supported
    if supported:
        padding = _conv_padding(conv)
        torch.testing.assert_close(F.conv2d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation), conv(x))
        a = patches(conv, x)  # (B, C_in·kh·kw, L): the layer is W a_l + b at every position
        flat = conv.weight.reshape(conv.out_channels, -1)
        torch.testing.assert_close((flat @ a + conv.bias[:, None]).reshape(conv(x).shape), conv(x))
        assert conv_padding(conv) == padding
    else:
        with pytest.raises(UnsupportedLayerError, match="not supported"):
            _conv_padding(conv)
    exact = dense_ggn(subset, x, "classification")
    factors = OutputFactors("classification")
    torch.testing.assert_close(factor_gradient_squares(subset, x, factors(model(x), y)), torch.diagonal(exact),
                               rtol=1e-10, atol=1e-14)

    def batches():
        yield x[:4], y[:4]
        yield x[4:], y[4:]

    curv = EKFACCurvature.fit(subset, batches, factors, progress=False)
    conv_blocks = [0, 1]  # conv weight and bias
    if supported:
        assert curv.fallback == []
        for blk in curv.blocks:
            if blk.index in conv_blocks:
                basis = torch.kron(blk.q_out, blk.q_in) if blk.is_weight else blk.q_out
                block = exact[subset.blocks[blk.index].slice, subset.blocks[blk.index].slice]
                torch.testing.assert_close(blk.eigenvalues.reshape(-1), torch.diagonal(basis.T @ block @ basis),
                                           rtol=1e-9, atol=1e-12)
    else:
        assert curv.fallback == conv_blocks
        positions = torch.arange(subset.blocks[1].offset + subset.blocks[1].numel)
        torch.testing.assert_close(curv.fallback_diag, torch.diagonal(exact)[positions], rtol=1e-10, atol=1e-14)


def test_same_padding_rule():
    """'same' is symmetric when dilation·(k − 1) is even in both dimensions; 'valid' is zero padding."""
    assert conv_padding(nn.Conv2d(1, 1, 5, padding="same")) == (2, 2)
    assert conv_padding(nn.Conv2d(1, 1, (3, 5), padding="same", dilation=(3, 1))) == (3, 2)
    assert conv_padding(nn.Conv2d(1, 1, 4, padding="same")) is None
    assert conv_padding(nn.Conv2d(1, 1, 3, padding="valid")) == (0, 0)
    assert conv_padding(nn.Conv2d(1, 1, 3, padding=(2, 1))) == (2, 1)


class _Broadcast(nn.Module):
    """A Linear applied to a (1, 4) constant and broadcast over the batch (like GPT-2's position embedding)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pos = nn.Linear(4, 3)
        self.inp = nn.Linear(3, 3)
        self.register_buffer("const", torch.randn(1, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inp(x) * torch.tanh(self.pos(self.const))


def test_a_layer_broadcast_over_the_batch_is_not_read_per_example():
    model = _Broadcast().to(DTYPE).eval()
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(5, 3, generator=g, dtype=DTYPE), torch.randint(0, 3, (5,), generator=g)
    subset = ParameterSubset(model, "all")
    exact = torch.diagonal(dense_ggn(subset, x, "classification"))
    factors = OutputFactors("classification")
    torch.testing.assert_close(factor_gradient_squares(subset, x, factors(model(x), y)), exact,
                               rtol=1e-10, atol=1e-14)
    curv = EKFACCurvature.fit(subset, lambda: iter([(x[:3], y[:3]), (x[3:], y[3:])]), factors, progress=False)
    assert [layer.name for layer in curv.layers] == ["inp"]
    torch.testing.assert_close(curv.fallback_diag, exact[:15], rtol=1e-10, atol=1e-14)  # pos.weight, pos.bias
    with pytest.raises(RuntimeError, match="not per example"):  # a first batch of one cannot tell
        EKFACCurvature.fit(subset, lambda: iter([(x[:1], y[:1]), (x[1:], y[1:])]), factors, progress=False)
