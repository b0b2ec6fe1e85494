"""Regression metrics for a Gaussian predictive (UCI protocol; see docs/metrics.md).

Models are trained on standardised targets ``y_std = (y − y_mean) / y_scale``;
the predictive mean, variance and targets are therefore given in standardised
units and ``y_scale`` (the training-split target standard deviation) converts
the metric to the original units. ``mean``, ``var`` and ``y`` must have the same
shape, either (N,) or (N, 1); mixed shapes are rejected instead of broadcast
(an (N,) minus an (N, 1) would silently become (N, N)). Results are Python
floats computed in float64; cost O(N).
"""

from __future__ import annotations

import math

import torch

from posthoc.utils.checks import check_finite, check_ndim, check_positive

__all__ = ["gaussian_nll", "rmse"]


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {}
    for name, t in tensors.items():
        check_ndim(t, (1, 2), name, "(N,) or (N, 1)")
        if t.ndim == 2 and t.shape[1] != 1:
            raise ValueError(f"{name} must have shape (N,) or (N, 1), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        check_finite(t, name)
        shapes[name] = tuple(t.shape)
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in shapes.items())
        raise ValueError(
            f"shape mismatch: {listed}; all must have the same shape (N,) or (N, 1), "
            "reshape them with .reshape(-1) rather than relying on broadcasting"
        )
    if next(iter(shapes.values()))[0] == 0:
        raise ValueError("inputs are empty; need at least one point")


def gaussian_nll(
    mean: torch.Tensor,
    var: torch.Tensor,
    y: torch.Tensor,
    y_scale: float = 1.0,
) -> float:
    """Mean Gaussian negative log-likelihood ``−mean_n log N(y_n; mean_n, var_n)``.

    Args:
        mean: (N,) or (N, 1) predictive means, standardised units.
        var: same shape, predictive variances (including observation noise
            σ²), standardised units; must be > 0.
        y: same shape, targets, standardised units.
        y_scale: target standard deviation used for standardisation (> 0).

    The density of the original-unit target is the standardised density
    divided by ``y_scale``, so the result is the standardised NLL plus
    ``log(y_scale)``; with ``y_scale=1`` it is the NLL in the given units.
    Cost: O(N).
    """
    _check_same_shape(mean=mean, var=var, y=y)
    check_positive(y_scale, "y_scale")
    if bool((var <= 0).any()):
        raise ValueError(f"var must be > 0; {int((var <= 0).sum())} entries are not")
    m, v, t = mean.double(), var.double(), y.double()
    per_point = 0.5 * (math.log(2 * math.pi) + v.log() + (t - m) ** 2 / v)
    return float(per_point.mean()) + math.log(float(y_scale))


def rmse(mean: torch.Tensor, y: torch.Tensor, y_scale: float = 1.0) -> float:
    """Root mean squared error ``y_scale · sqrt(mean_n (mean_n − y_n)²)``.

    Args:
        mean: (N,) or (N, 1) predictive means, standardised units.
        y: same shape, targets, standardised units.
        y_scale: target standard deviation (> 0); the result is in original units.

    Cost: O(N).
    """
    _check_same_shape(mean=mean, y=y)
    check_positive(y_scale, "y_scale")
    mse = ((mean.double() - y.double()) ** 2).mean()
    return float(mse.sqrt()) * float(y_scale)
