"""One output-variance scale κ fitted on validation data, for any Gaussian predictive.

κ multiplies the predictive covariance (Σ -> κ Σ, the mean is kept). It is the calibration
step allowed for streamlined prediction (see docs/streamlined.md); the same function fits it for any
method's Gaussian predictive (e.g. the glm predictive of a Laplace approximation), so that
methods can be compared with and without it on equal terms.
"""

from __future__ import annotations

import math

import torch

from posthoc.likelihood import Likelihood, check_supported
from posthoc.metrics import nll
from posthoc.predictive.gaussian import GaussianPredictive
from posthoc.predictive.links import LinkApprox, probit
from posthoc.utils.checks import check_choice

GRID_POINTS = 61
GOLDEN_STEPS = 40


def scaled_gaussian(mean: torch.Tensor, cov_or_var: torch.Tensor, scale: float,
                    cov_factor: torch.Tensor | None = None,
                    link_approx: LinkApprox | str = LinkApprox.PROBIT) -> GaussianPredictive:
    """N(mean (B, C), κ Σ) from a covariance (B, C, C) or variances (B, C); κ = ``scale`` > 0.

    With ``cov_factor`` F (B, C, R), Σ = F Fᵀ + diag(``cov_or_var``), kept factored (F scaled by √κ).
    A covariance is symmetrised (round-off of propagated covariances). Cost: O(B·C²), O(B·C·R) or O(B·C).

    Raises:
        ValueError: Unless ``scale`` > 0.
    """
    if not scale > 0:
        raise ValueError(f"the variance scale must be > 0, got {scale}")
    if cov_factor is not None:
        return GaussianPredictive(mean, var=scale * cov_or_var,
                                  cov_factor=cov_factor if scale == 1 else math.sqrt(scale) * cov_factor,
                                  link_approx=link_approx)
    scaled = cov_or_var if scale == 1 else scale * cov_or_var
    if cov_or_var.ndim == 3:
        return GaussianPredictive(mean, cov=torch.add(scaled, scaled.transpose(1, 2)).mul_(0.5),
                                  link_approx=link_approx)
    return GaussianPredictive(mean, var=scaled, link_approx=link_approx)


def scale_predictive(pred: GaussianPredictive, scale: float) -> GaussianPredictive:
    """N(mean, κ Σ): the same predictive (and default link) with its covariance (or variances) multiplied by κ > 0."""
    if pred.cov_factor is not None and pred.cov_diag is not None:
        return scaled_gaussian(pred.mean, pred.cov_diag, scale, pred.cov_factor, pred.link_approx)
    return scaled_gaussian(pred.mean, pred.cov if pred.has_full_cov else pred.var, scale,
                           link_approx=pred.link_approx)


def fit_variance_scale(pred: GaussianPredictive, targets: torch.Tensor, likelihood: Likelihood | str,
                       sigma_noise: float = 1.0, bounds: tuple[float, float] = (1e-3, 1e3)) -> float:
    """κ minimising the validation NLL of ``scale_predictive(pred, κ)`` over log κ in ``bounds``.

    ``pred``: the predictive on the validation inputs (B, C); ``targets``: labels (B,) for
    classification (probit link) or values (B, C) for regression (Gaussian likelihood with
    ``sigma_noise`` added). A grid of 61 points in log κ, then 40 golden-section steps around
    the best. Cost: about 100 NLL evaluations on the B predictions, no network pass.
    Raises ValueError for bounds not 0 < low < high, labels out of range, or regression targets
    of another shape than the predictive's (B, C) ((B,) allowed when C = 1).
    """
    likelihood = check_supported(check_choice(likelihood, Likelihood, "likelihood"), (Likelihood.CLASSIFICATION, Likelihood.REGRESSION), "fit_variance_scale")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    mean = pred.mean
    var = pred.var
    if likelihood is Likelihood.REGRESSION and not (
            targets.shape == mean.shape or (mean.shape[1] == 1 and targets.shape == mean.shape[:1])):
        # a reshape would silently pair targets with the wrong outputs (e.g. (C, B) given for (B, C))
        raise ValueError(f"regression targets of shape {tuple(targets.shape)} do not match the predictive's "
                         f"{tuple(mean.shape)}: give targets of shape {tuple(mean.shape)}"
                         + (f" or ({mean.shape[0]},)" if mean.shape[1] == 1 else ""))

    def loss(log_k: float) -> float:
        k = math.exp(log_k)
        if likelihood is Likelihood.CLASSIFICATION:
            return nll(probit(mean, k * var), targets)
        scaled = scale_predictive(pred, k).with_noise(sigma_noise)
        return float(-scaled.log_prob(targets.reshape(mean.shape)).mean())

    lo, hi = math.log(lo), math.log(hi)
    grid = [lo + (hi - lo) * i / (GRID_POINTS - 1) for i in range(GRID_POINTS)]
    values = [loss(g) for g in grid]
    best = min(range(len(grid)), key=values.__getitem__)
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    f_c, f_d = loss(c), loss(d)
    for _ in range(GOLDEN_STEPS):  # each step keeps one interior point and its value: one new evaluation
        if f_c < f_d:
            b, d, f_d = d, c, f_c
            c = b - ratio * (b - a)
            f_c = loss(c)
        else:
            a, c, f_c = c, d, f_d
            d = a + ratio * (b - a)
            f_d = loss(d)
    return math.exp(0.5 * (a + b))
