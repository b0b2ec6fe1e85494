"""Choosing a subnetwork for ``subset_of_weights="subnetwork"``."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from posthoc.likelihood import Likelihood


def largest_variance_indices(model: nn.Module, train_loader: Iterable, likelihood: Likelihood | str,
                             n_params: int, prior_precision: float = 1.0, progress: bool = True,
                             **laplace_kwargs) -> torch.Tensor:
    """Positions (n_params,) of the weights with the largest marginal posterior variance
    under a diagonal Laplace approximation over all weights (Daxberger et al. 2021).

    Cost: one diagonal-LA fit (a pass with per-example gradients). The indices are
    in parameters_to_vector order, ready for ``Laplace(..., subnetwork_indices=...)``.
    """
    from posthoc.laplace.laplace import Laplace

    diag = Laplace(model, likelihood, subset_of_weights="all", hessian_structure="diag",
                   prior_precision=prior_precision, progress=progress, **laplace_kwargs).fit(train_loader)
    if not 1 <= n_params <= diag.n_params:
        raise ValueError(f"n_params must lie in [1, {diag.n_params}], got {n_params}")
    return torch.topk(diag.posterior_variance(), n_params).indices.sort().values
