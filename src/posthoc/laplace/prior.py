"""Prior precision delta of theta ~ N(0, diag(delta)^-1): scalar, per layer or per parameter.

A "layer" is one covered parameter tensor (a ParamBlock): a Linear layer's
weight and bias are two layers, as in laplace-torch.
"""

from __future__ import annotations

from enum import Enum

import torch

from posthoc.network.subset import ParameterSubset


class PriorKind(str, Enum):
    """The shape of a prior precision: one value, one per covered parameter tensor, or one per parameter."""

    SCALAR = "scalar"
    LAYER = "layer"
    PARAMETER = "parameter"


def prior_kind(prior: torch.Tensor, subset: ParameterSubset) -> PriorKind:
    """Classify a prior tensor by its length: 1, number of blocks, or P.

    Raises ValueError for other shapes or non-positive/non-finite values.
    """
    n_blocks, n_params = len(subset.blocks), subset.n_params
    if prior.ndim > 1:
        raise ValueError(f"prior_precision must be a scalar or a vector, got shape {tuple(prior.shape)}")
    if not bool(torch.all(torch.isfinite(prior))) or not bool(torch.all(prior > 0)):
        raise ValueError("prior_precision must be finite and > 0")
    n = prior.numel()
    if n == 1:
        return PriorKind.SCALAR
    if n == n_blocks and n != n_params:
        return PriorKind.LAYER
    if n == n_params:
        return PriorKind.PARAMETER
    raise ValueError(
        f"prior_precision has {n} entries; give 1 (scalar), {n_blocks} (one per parameter tensor) "
        f"or {n_params} (one per parameter)"
    )


def as_prior_tensor(value: float | torch.Tensor, subset: ParameterSubset) -> torch.Tensor:
    """A 1-D prior tensor in the subset's dtype/device, validated."""
    prior = torch.as_tensor(value, dtype=subset.dtype, device=subset.device).reshape(-1)
    prior_kind(prior, subset)
    return prior


def per_parameter(prior: torch.Tensor, subset: ParameterSubset) -> torch.Tensor:
    """Expand a prior tensor to (P,) (differentiable)."""
    kind = prior_kind(prior.detach(), subset)
    if kind is PriorKind.SCALAR:
        return prior.expand(subset.n_params)
    if kind is PriorKind.LAYER:
        return prior[subset.block_ids()]
    return prior


def per_block(prior: torch.Tensor, subset: ParameterSubset, structure: str) -> torch.Tensor:
    """Expand a scalar or per-layer prior to (n_blocks,); a per-parameter prior is an error here."""
    kind = prior_kind(prior.detach(), subset)
    if kind is PriorKind.PARAMETER:
        raise ValueError(
            f"hessian_structure={structure!r} supports a scalar or per-layer prior precision only; "
            "a per-parameter prior needs hessian_structure 'diag', 'full' or 'lowrank'"
        )
    return prior.expand(len(subset.blocks)) if kind is PriorKind.SCALAR else prior
