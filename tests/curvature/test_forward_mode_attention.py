"""JVPs through attention kernels without forward-mode derivatives (jacobians.forward_mode_attention).

nn.MultiheadAttention in eval mode takes a fused fast path (``aten::_native_multi_head_attention``, what
torchvision's VisionTransformer runs) and scaled_dot_product_attention a fused CPU flash kernel; neither has a
forward-mode derivative. jvp_many must still give J V, checked against central finite differences of the model
(float64), and leave the global attention settings as it found them.
"""

from __future__ import annotations

import torch
from torch import nn

from posthoc.curvature.jacobians import forward_mode_attention, jvp_many
from posthoc.network.subset import ParameterSubset


class _Attention(nn.Module):
    """Tokens (B, 4, 6) -> self-attention (2 heads, batch first) -> mean over tokens -> Linear to 3 outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))


def test_jvp_through_multihead_attention_matches_finite_differences():
    model = _Attention().double().eval()
    x = torch.randn(5, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    subset = ParameterSubset(model, "all")
    directions = torch.randn(2, subset.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.backends.mha.get_fastpath_enabled()
    got = jvp_many(subset, x, directions)  # (K, B, C)
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    step = 1e-6
    expected = torch.stack([(subset.forward(x, subset.theta_map + step * v) - subset.forward(x, subset.theta_map
                                                                                            - step * v)) / (2 * step)
                            for v in directions]).detach()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_settings_restored_after_an_error():
    before = torch.backends.mha.get_fastpath_enabled()
    try:
        with forward_mode_attention():
            assert not torch.backends.mha.get_fastpath_enabled()
            raise KeyError("inside")
    except KeyError:
        pass
    assert torch.backends.mha.get_fastpath_enabled() == before
