"""Rules for element-wise activations (linearised at the mean, or moment-matched) and for pass-through layers.

The pass-through layers only re-index or pass their input on: Identity, Dropout at test time, Flatten.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from posthoc.streamlined.moments import Moments, rearrange
from posthoc.streamlined.rules.base import (
    ActivationRule,
    Context,
    Step,
    UnsupportedLayerError,
    advance,
    register_rule,
)

QUADRATURE_NODES = 32  # Gauss-Hermite nodes of the moment-matched smooth activations (error ~1e-3 at σ² = 3)


@lru_cache(maxsize=1)
def _hermite_rule(n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and normalised weights of the n-node Gauss-Hermite rule for N(0, 1), computed once per process."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(n_nodes)  # weight exp(-x²/2)
    return nodes, weights / weights.sum()


def _times_slope(module: nn.SiLU | nn.GELU, t: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """The product t · g'(μ) by torch's fused derivative kernel of SiLU or GELU (one op instead of about ten)."""
    if isinstance(module, nn.SiLU):
        return torch.ops.aten.silu_backward(t, mu)
    return torch.ops.aten.gelu_backward(t, mu, approximate=module.approximate)


def _activation_derivative(module: nn.Module, mu: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.ReLU):
        # the 0/1 mask written by the comparison in μ's dtype: a product with a float mask is about twice as fast as
        # with a bool one (no per-element cast), and the mask is its own square (see ElementwiseStep's is_mask)
        return torch.gt(mu, 0, out=torch.empty_like(mu))
    if isinstance(module, (nn.SiLU, nn.GELU)):
        return _times_slope(module, torch.ones_like(mu), mu)
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


def gaussian_variance(module: nn.Module, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Var g(z) for z ~ N(μ, σ²) elementwise, g the activation ``module``: same shape as μ.

    ReLU in closed form; GELU (either form), SiLU, tanh and sigmoid by Gauss-Hermite quadrature with
    QUADRATURE_NODES nodes (memory and cost QUADRATURE_NODES times μ's). σ² = 0 gives 0.
    """
    sd = var.clamp_min(0).sqrt()
    if isinstance(module, nn.ReLU):
        a = mu / torch.where(sd > 0, sd, torch.ones_like(sd))
        upper, lower = 0.5 * torch.erfc(-a / math.sqrt(2)), 0.5 * torch.erfc(a / math.sqrt(2))  # Φ(a), 1 - Φ(a)
        pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
        # Var / σ² = Φ + a² Φ (1 - Φ) + a φ (1 - 2Φ) - φ², a = μ / σ: E[g²] - E[g]² cancels the μ² terms, which in
        # float32 lost the variance of units far on the linear side (μ = 100, σ² = 1e-4 gave 0)
        scaled = upper + a * a * upper * lower + a * pdf * (lower - upper) - pdf * pdf
        return torch.where(sd > 0, (var * scaled).clamp_min(0), torch.zeros_like(mu))
    nodes, weights = _hermite_rule(QUADRATURE_NODES)
    x = torch.as_tensor(nodes, dtype=mu.dtype, device=mu.device)
    w = torch.as_tensor(weights, dtype=mu.dtype, device=mu.device)
    g = module(mu.unsqueeze(-1) + sd.unsqueeze(-1) * x)
    first = g @ w
    return (g - first.unsqueeze(-1)).square() @ w


@register_rule(nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU)
def activation_rule(module: nn.Module, state: Moments, ctx: Context, last: bool) -> Moments:
    """G linearised at the mean: μ <- g(μ), Σ <- D Σ D with D = diag(g'(μ)) (ReLU: g'(0) = 0).

    ``ctx.activations == "moment_matched"`` (diagonal mode only): the variance is Var g(z) for z ~ N(μ, σ²)
    (:func:`gaussian_variance`) while the mean stays g(μ), so the propagated mean is still model(x).
    """
    if ctx.activations is ActivationRule.MOMENT_MATCHED:
        if ctx.full:
            raise ValueError("activations='moment_matched' is a diagonal-mode rule (it gives variances, not the "
                             "cross-covariances the full mode carries); use activation_covariance='diagonal' or "
                             "activations='linearized'")
        var = None if state.var is None else gaussian_variance(module, state.mean, state.var)
        return Moments(module(state.mean), var=var)
    if not ctx.full and isinstance(module, (nn.SiLU, nn.GELU)):
        # var · g'(μ)² as two fused derivative passes, each t · g'(μ), without forming the slope: 3/4 of the time of
        # the slope, its square and the product (a BERT-base GELU input, one thread: 74 against 100 ms)
        var = None if state.var is None else _times_slope(module, _times_slope(module, state.var, state.mean),
                                                          state.mean)
        return Moments(module(state.mean), var=var)  # after the variance: an in-place module overwrites μ
    mean, slope = _value_and_slope(module, state.mean)
    return advance(state, ElementwiseStep(mean, slope, is_mask=isinstance(module, nn.ReLU)), ctx)


def _value_and_slope(module: nn.Module, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g(μ) and g'(μ); tanh and sigmoid reuse g(μ) for the slope (one transcendental pass instead of two)."""
    if isinstance(module, nn.Tanh):
        value = torch.tanh(mu)
        return value, 1 - value.square()
    if isinstance(module, nn.Sigmoid):
        value = torch.sigmoid(mu)
        return value, value * (1 - value)
    slope = _activation_derivative(module, mu)  # before the module runs: an in-place one overwrites μ
    return module(mu), slope


@register_rule(nn.Dropout, nn.Identity)
def identity_rule(module: nn.Module, state: Moments, ctx: Context, last: bool) -> Moments:
    """Identity (Dropout at test time)."""
    return state


@register_rule(nn.Flatten)
def flatten_rule(module: nn.Flatten, state: Moments, ctx: Context, last: bool) -> Moments:
    """A re-indexing: the full covariance's row-major order is unchanged."""
    return rearrange(state, module)
