"""ScaLLA's grid search of the prior precision on held-out data (``ScaLLA.optimize_prior_precision``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

from posthoc.predictive import GaussianPredictive, LinkApprox
from posthoc.predictive.tuning import checked_grid, default_grid, grid_search, validation_nll_sum
from posthoc.scalla.positions import kept_rows
from posthoc.utils.modes import eval_mode

if TYPE_CHECKING:
    from posthoc.scalla.scalla import ScaLLA


@torch.no_grad()
def gridsearch_prior(scalla: ScaLLA, val_loader: Iterable | None, grid: torch.Tensor | None,
                     link_approx: LinkApprox | str) -> torch.Tensor:
    """The delta in ``grid`` (default logspace(-4, 4, 33)) with the lowest NLL on ``val_loader``; not set on ``scalla``.

    The network outputs and surrogate features of the validation data are computed once (one forward pass of
    each per batch), then each delta costs an O(n m^2 C) covariance. Outputs with positions: the NLL sums over
    the kept positions (targets other than ``scalla.ignore_index``).

    Raises:
        ValueError: no ``val_loader``, an empty one, an invalid grid. RuntimeError: not fitted, or the model's
            weights changed since fit. FloatingPointError: no grid value has a finite NLL.
    """
    if val_loader is None:
        raise ValueError("method='gridsearch' needs val_loader (held-out data, never the test set)")
    posterior = scalla._require_fit("tune the prior precision")
    subset = scalla.subset
    grid = checked_grid(default_grid(-4, 4, 33, subset.dtype) if grid is None else grid, subset.dtype)
    cached = []
    for x, y in scalla._batches(val_loader):
        scalla._check_shape(x, "validation inputs")
        with eval_mode(scalla.model):
            outputs, features = scalla.call(x), scalla._require_surrogate()(x)
        if scalla.position_dims:
            features, outputs, y = kept_rows(features, outputs, y, scalla.likelihood, scalla.ignore_index)
        cached.append((outputs, features, y))
    if not cached:
        raise ValueError("val_loader yielded no batches")
    scale = scalla.factors.scale(scalla.sigma_noise)

    def validation_nll(delta: torch.Tensor) -> float:
        return sum((validation_nll_sum(GaussianPredictive(mean, cov=posterior.covariance(phi, delta, scale)), y,
                                       scalla.likelihood, scalla.sigma_noise, link_approx, scalla.seed)
                    for mean, phi, y in cached), 0.0)

    return grid_search(validation_nll, grid, progress=scalla.progress)
