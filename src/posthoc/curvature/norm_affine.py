"""The exact diagonal curvature of normalisation layers' affine parameters from their output gradients.

BatchNorm in eval mode (running statistics), LayerNorm and GroupNorm compute y = γ ⊙ x̂ + β, with x̂ the
normalised input, which does not depend on γ or β. Laid out channels first, (B, D, L) with D the entries of γ
and L the positions sharing each entry (BatchNorm/GroupNorm: the spatial positions of a channel; LayerNorm:
the leading dimensions before its normalised shape), the per-example gradients of one output column are

    ∂/∂γ = Σ_l g_l ⊙ x̂_l,        ∂/∂β = Σ_l g_l,

with g the column's gradient in the layer's output. So the exact diagonal Σ_n Σ_k (J_nᵀ s_nk)² and the glm
term J_n diag(w) J_nᵀ of these parameters need only the layer's input and output gradients that the Kronecker
structures already record in their forward and backward passes: O(B·K·L·D) per layer and no per-example
gradient through the network (the generic fallback's vmap, which made the all-weights KFAC data pass of
BatchNorm networks cost more in the fallback than in the Kronecker layers).

Not routed here (they keep the generic exact fallback): BatchNorm in training mode or without running
statistics (its statistics couple the examples of a batch), and a layer called more than once per forward or
whose parameters are read elsewhere (decided by :func:`posthoc.curvature.kfac.probe_layers`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, _BatchNorm)  # the layer types this module lays out and reads


def norm_route_ok(module: nn.Module) -> bool:
    """Whether ``module``'s affine parameters can be read from its input and output gradients (see the module doc).

    True for LayerNorm / GroupNorm with affine parameters and for BatchNorm in eval mode with running statistics.
    Cost: O(1).
    """
    if isinstance(module, nn.LayerNorm):
        return module.elementwise_affine
    if isinstance(module, nn.GroupNorm):
        return module.affine
    if isinstance(module, _BatchNorm):
        return (module.affine and not module.training and module.track_running_stats
                and module.running_mean is not None and module.running_var is not None)
    return False


def norm_channels_first(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like the layer's input or output, (B, ...), as (B, D, L) with D the entries of γ (a view).

    BatchNorm/GroupNorm: channels are dimension 1. LayerNorm: its normalised shape is the trailing dimensions.
    """
    if isinstance(module, nn.LayerNorm):
        width = 1
        for size in module.normalized_shape:
            width *= size
        return tensor.reshape(tensor.shape[0], -1, width).mT
    return tensor.reshape(tensor.shape[0], tensor.shape[1], -1)


def normalised_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x̂ for the layer's input x (B, ...), the tensor γ multiplies, channels first (B, D, L).

    Recomputed with the layer's own functional form, so γ ⊙ x̂ + β is the layer's output to rounding.
    Raises ValueError for a module :func:`norm_route_ok` refuses. Cost: one normalisation of x.
    """
    if not norm_route_ok(module):
        raise ValueError(f"{type(module).__name__} is not read by the normalisation route (training-mode or "
                         "statistics-free BatchNorm, or no affine parameters)")
    if isinstance(module, nn.LayerNorm):
        x_hat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    elif isinstance(module, nn.GroupNorm):
        x_hat = F.group_norm(x, module.num_groups, None, None, module.eps)
    else:
        assert isinstance(module, _BatchNorm)
        x_hat = F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
    return norm_channels_first(module, x_hat)


def norm_gradients(x_hat: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients of (γ, β) for output gradients ``grads`` (B, ..., D, L): each (B, ..., D).

    ``x_hat`` (B, D, L) from :func:`normalised_input`; ``grads`` channels first with any number of column
    dimensions between the example and D (e.g. (B, C, D, L) for the C outputs). Cost O(numel of grads).
    """
    shape = (x_hat.shape[0],) + (1,) * (grads.ndim - 3) + tuple(x_hat.shape[1:])
    return (grads * x_hat.reshape(shape)).sum(-1), grads.sum(-1)


def norm_squared_gradients(x_hat: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_n (∂/∂γ)² and Σ_n (∂/∂β)² for one output column's gradients ``grad`` (B, D, L): each (D,)."""
    weight, bias = norm_gradients(x_hat, grad)
    return weight.square().sum(0), bias.square().sum(0)


def norm_grams(x_hat: torch.Tensor, grads: torch.Tensor, weight_scale: torch.Tensor | None,
               bias_scale: torch.Tensor | None) -> torch.Tensor:
    """J_n diag(w) J_nᵀ of the covered affine parameters for every example: (B, C, C).

    ``grads`` (B, C, D, L) the gradients of the C outputs in the layer's output; ``weight_scale`` /
    ``bias_scale`` (D,) the diagonal weights w of γ and β (None where not covered). Cost O(B·C·D·(L + C)).
    """
    weight, bias = norm_gradients(x_hat, grads)  # (B, C, D) each
    out = grads.new_zeros(grads.shape[0], grads.shape[1], grads.shape[1])
    for rows, scale in ((weight, weight_scale), (bias, bias_scale)):
        if scale is not None:
            out = out + (rows * scale) @ rows.mT
    return out
