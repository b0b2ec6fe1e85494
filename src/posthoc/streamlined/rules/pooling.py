"""Rules for pooling: max pooling by the argmax of the mean, average pooling as a fixed linear map.

Max pooling passes the moments of each window's argmax-of-mean input; average pooling is exact in full mode.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from posthoc.streamlined.moments import Moments
from posthoc.streamlined.rules.base import Context, PoolingRule, Step, UnsupportedLayerError, advance, register_rule


class MaxPoolStep(Step):
    """Passes the moments of the input that is the argmax of the mean in each window."""

    def __init__(self, module: nn.MaxPool2d, state: Moments) -> None:
        m = module
        self.mean, self.index = F.max_pool2d(state.mean, m.kernel_size, m.stride, m.padding, m.dilation,
                                             ceil_mode=m.ceil_mode, return_indices=True)

    def _gather(self, x: torch.Tensor, lead: int) -> torch.Tensor:
        index = self.index.flatten(2)  # (B, C, L_out)
        if lead:
            index = index.unsqueeze(1).expand(x.shape[0], x.shape[1], *index.shape[1:])
        out = torch.gather(x.flatten(-2), -1, index)
        return out.reshape(*x.shape[:-2], *self.mean.shape[-2:])

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        """J on directions (B, N, *in_shape) -> (B, N, *out_shape): the entries at each window's argmax of the mean."""
        return self._gather(directions, lead=1)

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        """Output variances (B, C, H', W'): the variances at each window's argmax of the mean."""
        return None if var_in is None else self._gather(var_in, lead=0)


@register_rule(nn.MaxPool2d)
def maxpool_rule(module: nn.MaxPool2d, state: Moments, ctx: Context, last: bool) -> Moments:
    """Max pooling: the moments of the argmax-of-mean input of each window."""
    if state.mean.ndim != 4:
        raise UnsupportedLayerError("MaxPool2d on batched (B, C, H, W) inputs only")
    return advance(state, MaxPoolStep(module, state), ctx)


class LinearMapStep(Step):
    """A fixed linear map f (no weights): J = f, diagonal variances by (F∘F) var."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], state: Moments,
                 var_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn, self.var_fn, self.in_shape = fn, var_fn, state.shape
        self.mean = fn(state.mean)

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        """J on directions (B, N, *in_shape) -> (B, N, *out_shape): the map applied to each direction."""
        b, n = directions.shape[:2]
        out = self.fn(directions.reshape(b * n, *self.in_shape))
        return out.reshape(b, n, *out.shape[1:])

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        """Output variances by the map on squared coefficients (``var_fn``), None stays None."""
        return None if var_in is None else self.var_fn(var_in)


def pooled_variance(pool: Callable[[torch.Tensor], torch.Tensor], divisor: int, rule: PoolingRule
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Diagonal-mode variance map of a pool y = Σ_i x_i / d over its entries (a mean: d = n, a sum: d = 1).

    ``pool`` maps x to y; "independent": Σ σ_i² / d² = pool(σ²) / d; "correlated": (Σ σ_i / d)² = pool(σ)², the
    entries perfectly correlated (variances clamped at 0 before the square root: round-off).
    """
    if rule is PoolingRule.CORRELATED:
        return lambda v: pool(v.clamp_min(0).sqrt()).square()
    return lambda v: pool(v) / divisor


@register_rule(nn.AvgPool2d, nn.AdaptiveAvgPool2d)
def avgpool_rule(module: nn.Module, state: Moments, ctx: Context, last: bool) -> Moments:
    """Average pooling is linear: exact in full mode; diagonal mode by ``ctx.pooling`` (:func:`pooled_variance`)."""
    if isinstance(module, nn.AvgPool2d):
        kh, kw = nn.modules.utils._pair(module.kernel_size)
        pad = nn.modules.utils._pair(module.padding)
        if module.divisor_override is not None or (any(pad) and not module.count_include_pad):
            raise UnsupportedLayerError("AvgPool2d with divisor_override or count_include_pad=False and padding")
        pool: Callable[[torch.Tensor], torch.Tensor] = module
    else:
        h, w = state.shape[-2:]
        oh, ow = nn.modules.utils._pair(module.output_size)
        oh, ow = oh or h, ow or w
        if h % oh or w % ow:
            raise UnsupportedLayerError(f"AdaptiveAvgPool2d({module.output_size}) on {h}x{w} inputs has unequal "
                                        "windows; supported: sizes that divide the input")
        kh, kw = h // oh, w // ow

        def pool(t: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(t, (kh, kw))
    return advance(state, LinearMapStep(module, state, pooled_variance(pool, kh * kw, ctx.pooling)), ctx)
