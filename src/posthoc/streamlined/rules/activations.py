"""Rules for element-wise activations (linearised at the mean) and for pass-through layers.

The pass-through layers only re-index or pass their input on: Identity, Dropout at test time, Flatten.
"""

from __future__ import annotations

import torch
from torch import nn

from posthoc.streamlined.moments import Moments, rearrange
from posthoc.streamlined.rules.base import Context, Step, UnsupportedLayerError, advance, register_rule


def _activation_derivative(module: nn.Module, mu: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.ReLU):
        # the 0/1 mask written by the comparison in μ's dtype: a product with a float mask is about twice as fast as
        # with a bool one (no per-element cast), and the mask is its own square (see ElementwiseStep's is_mask)
        return torch.gt(mu, 0, out=torch.empty_like(mu))
    if isinstance(module, nn.Tanh):
        return 1 - torch.tanh(mu).square()
    if isinstance(module, nn.Sigmoid):
        s = torch.sigmoid(mu)
        return s * (1 - s)
    # SiLU and GELU: torch's own fused derivative kernels (one op instead of about ten elementwise ones)
    if isinstance(module, nn.SiLU):
        return torch.ops.aten.silu_backward(torch.ones_like(mu), mu)
    if isinstance(module, nn.GELU):
        return torch.ops.aten.gelu_backward(torch.ones_like(mu), mu, approximate=module.approximate)
    raise UnsupportedLayerError(type(module).__name__)


class ElementwiseStep(Step):
    """An element-wise activation linearised at the input mean: y ≈ f(μ) + f'(μ) (x - μ).

    ``is_mask``: the slope holds only 0 and 1 (ReLU), so the variances are multiplied by it once.
    """
    def __init__(self, mean: torch.Tensor, slope: torch.Tensor, is_mask: bool = False) -> None:
        self.mean, self.slope, self.is_mask = mean, slope, is_mask

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        """J on directions (B, N, *in_shape) -> (B, N, *out_shape): scaled by the slope f'(μ), O(B N D)."""
        return directions * self.slope.unsqueeze(1)

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        """Output variances (B, *shape): the input variances times the squared slope (None stays None)."""
        if var_in is None:
            return None
        if self.is_mask or self.slope.dtype == torch.bool:
            return var_in * self.slope
        return torch.mul(var_in, self.slope).mul_(self.slope)


@register_rule(nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU)
def activation_rule(module: nn.Module, state: Moments, ctx: Context, last: bool) -> Moments:
    """G linearised at the mean: μ <- g(μ), Σ <- D Σ D with D = diag(g'(μ)) (ReLU: g'(0) = 0)."""
    slope = _activation_derivative(module, state.mean)  # before the module runs: an in-place one overwrites μ
    step = ElementwiseStep(module(state.mean), slope, is_mask=isinstance(module, nn.ReLU))
    return advance(state, step, ctx)


@register_rule(nn.Dropout, nn.Identity)
def identity_rule(module: nn.Module, state: Moments, ctx: Context, last: bool) -> Moments:
    """Identity (Dropout at test time)."""
    return state


@register_rule(nn.Flatten)
def flatten_rule(module: nn.Flatten, state: Moments, ctx: Context, last: bool) -> Moments:
    """A re-indexing: the full covariance's row-major order is unchanged."""
    return rearrange(state, module)
