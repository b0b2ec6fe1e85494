"""Rules for nn.Conv1d, transformers' Conv1D, nn.GroupNorm and the functional layer_norm / group_norm.

Conv1d is the Conv2d rule on a (B, C, 1, L) view, and Conv1D (GPT-2's projections, y = x W + b with W stored
(D_in, D_out)) the Linear rule with Wᵀ; both read the layer's own posterior, diagonal, Kronecker or full (Conv1d's
flattened input order C_in·k is the same; Conv1D's weight entries are read transposed). GroupNorm normalises each
group of C/G channels like a LayerNorm over them (statistics frozen or linearised, ``ctx.layernorm``), then applies
a per-channel affine map.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, cast

import torch
from torch import nn

from posthoc.streamlined.moments import Moments, rearrange
from posthoc.streamlined.rules.affine import ConvStep, linear_rule
from posthoc.streamlined.rules.base import (
    RULES,
    Context,
    UnsupportedLayerError,
    advance,
    register_rule,
)
from posthoc.streamlined.rules.normalisation import AffineNormStep, _param_var, input_variances, last_axis_normaliser
from posthoc.streamlined.rules.ops import UnsupportedOpError, _mean_of
from posthoc.streamlined.rules.weight_cache import cached_on, stand_in_linear
from posthoc.streamlined.weight_posteriors import LayerPosterior
from posthoc.utils.registry import add_to_registry


def _with_stand_in(ctx: Context, stand_in: nn.Module, post: LayerPosterior | None) -> Context:
    """A context whose posterior gives ``stand_in`` (a reshaped copy of a layer) the layer's posterior."""
    posterior = copy.copy(ctx.posterior)
    posterior._by_id = {**ctx.posterior._by_id}
    if post is not None:
        posterior._by_id[id(stand_in)] = post
    return dataclasses.replace(ctx, posterior=posterior)


@register_rule(nn.Conv1d)
def conv1d_rule(module: nn.Conv1d, state: Moments, ctx: Context, last: bool) -> Moments:
    """Conv1d on (B, C, L): the Conv2d rule on the (B, C, 1, L) view (same weights and posterior), O(Conv2d's)."""
    if isinstance(module.padding, str) and module.padding != "valid":
        raise UnsupportedLayerError(f"Conv1d with padding={module.padding!r} (supported: integers or 'valid')")
    padding = 0 if module.padding == "valid" else int(module.padding[0])

    def build() -> nn.Conv2d:
        conv = nn.Conv2d(module.in_channels, module.out_channels, (1, module.kernel_size[0]), (1, module.stride[0]),
                         (0, padding), (1, module.dilation[0]), module.groups, module.bias is not None,
                         module.padding_mode, device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(module.weight.unsqueeze(2))
            if module.bias is not None and conv.bias is not None:
                conv.bias.copy_(module.bias)
        return conv.requires_grad_(False)
    conv = cached_on((module.weight, module.bias), "stand-in conv2d", build)
    sub_ctx = _with_stand_in(ctx, conv, ctx.posterior.get(module))
    image = rearrange(state, lambda t: t.unsqueeze(-2))
    out = advance(image, ConvStep(conv, image, sub_ctx), sub_ctx)
    return rearrange(out, lambda t: t.squeeze(-2))


def _conv1d_as_linear_posterior(module: nn.Module, post: LayerPosterior) -> LayerPosterior:
    """A Conv1D's posterior as its stand-in nn.Linear's: the weight's entries (D_in, D_out) read as (D_out, D_in).

    Diagonal: the variances transposed. Kronecker: the factor unchanged (the KFAC structure keeps a Conv1D weight's
    block in the (D_out, D_in) layout, ``KronBlock.transposed``). Full: the weight's rows and columns of the dense
    covariance permuted to the transposed order. Cost: one gather of the full covariance, else views.
    """
    weight = cast(torch.Tensor, module.weight)
    d_in, d_out = int(weight.shape[0]), int(weight.shape[1])
    stand_in = LayerPosterior(diag={k: v.T if k == "weight" else v for k, v in post.diag.items()},
                              kron=dict(post.kron))
    if post.full is not None:
        attrs, cov = post.full
        parts, offset = [], 0
        for attr in attrs:
            n = getattr(module, attr).numel()
            positions = torch.arange(offset, offset + n, device=cov.device)
            parts.append(positions.reshape(d_in, d_out).T.reshape(-1) if attr == "weight" else positions)
            offset += n
        order = torch.cat(parts)
        stand_in.full = (list(attrs), cov[order][:, order])
    return stand_in


def conv1d_as_linear(module: nn.Module, ctx: Context) -> tuple[nn.Linear, Context]:
    """Transformers' Conv1D as an nn.Linear holding Wᵀ, and a context giving it the layer's posterior.

    The posterior (diagonal, Kronecker or full) is read in the Linear's layout (:func:`_conv1d_as_linear_posterior`).
    Cost: a copy of the weights (and of a full posterior's covariance).
    """
    weight, bias = cast(torch.Tensor, module.weight), cast(torch.Tensor, module.bias)  # W (D_in, D_out)
    linear = stand_in_linear(weight.T, bias)
    post = ctx.posterior.get(module)
    stand_in_post = None if post is None else _conv1d_as_linear_posterior(module, post)
    return linear, _with_stand_in(ctx, linear, stand_in_post)


def hf_conv1d_rule(module: nn.Module, state: Moments, ctx: Context, last: bool) -> Moments:
    """Transformers' Conv1D (y = x W + b, W (D_in, D_out)): the Linear rule with Wᵀ (:func:`conv1d_as_linear`).

    Diagonal, Kronecker or full layer posterior. Cost: the Linear rule's.
    """
    linear, linear_ctx = conv1d_as_linear(module, ctx)
    return linear_rule(linear, state, linear_ctx, last)


# keyed by the class's registry key, so transformers is not imported (rule_key of transformers.pytorch_utils.Conv1D)
add_to_registry(RULES, "module transformers.pytorch_utils.Conv1D", hf_conv1d_rule, "moment-propagation rule")


def _group_norm(state: Moments, groups: int, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                gamma_var: torch.Tensor | None, beta_var: torch.Tensor | None, eps: float, ctx: Context) -> Moments:
    mu = state.mean
    batch, channels = mu.shape[:2]
    if channels % groups:
        raise UnsupportedLayerError(f"GroupNorm of {channels} channels in {groups} groups")
    var_in = input_variances(state)
    n, n_jac, n_var = last_axis_normaliser(mu.reshape(batch, groups, -1), eps, ctx.layernorm,
                                           None if var_in is None else var_in.reshape(batch, groups, -1))

    def jac(directions: torch.Tensor) -> torch.Tensor:
        return n_jac(directions.reshape(batch, directions.shape[1], groups, -1)).reshape(directions.shape)

    def var(v: torch.Tensor) -> torch.Tensor:
        return n_var(v.reshape(batch, groups, -1)).reshape(v.shape)

    step = AffineNormStep(n.reshape(mu.shape), gamma, beta, gamma_var, beta_var, 0, jac, var, state.shape)
    return advance(state, step, ctx)


@register_rule(nn.GroupNorm)
def groupnorm_rule(module: nn.GroupNorm, state: Moments, ctx: Context, last: bool) -> Moments:
    """GroupNorm on (B, C, *): per group a LayerNorm over its C/G channels and positions, then γ_c, β_c.

    γ and β may carry diagonal variances. Cost O(B C S) in diagonal mode.
    """
    post = ctx.posterior.get(module)
    return _group_norm(state, module.num_groups, module.weight, module.bias, _param_var(post, "weight", "GroupNorm"),
                       _param_var(post, "bias", "GroupNorm"), module.eps, ctx)


_LAYER_NORM_ARGS = ("input", "normalized_shape", "weight", "bias", "eps")
_GROUP_NORM_ARGS = ("input", "num_groups", "weight", "bias", "eps")


@register_rule(torch.nn.functional.layer_norm, torch.layer_norm)
def layer_norm_op_rule(op: Callable[..., Any], args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """F.layer_norm over the last axis with a fixed weight and bias: the nn.LayerNorm rule (frozen / linearised).

    A random weight would be read by a get_attr node, which the traced walk refuses.
    """
    bound = {k: _mean_of(v) for k, v in (dict(zip(_LAYER_NORM_ARGS, args, strict=False)) | kwargs).items()}
    state = args[0]
    if not isinstance(state, Moments) or any(isinstance(v, Moments) for v in bound.values()):
        raise UnsupportedOpError("layer_norm of a random input with a fixed weight and bias")
    shape = bound["normalized_shape"]
    if len(tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (shape,)) != 1:
        raise UnsupportedOpError("layer_norm over the last axis only (normalized_shape of length 1)")
    mu = state.mean
    n, n_jac, n_var = last_axis_normaliser(mu, float(bound.get("eps", 1e-5)), ctx.layernorm, input_variances(state))
    step = AffineNormStep(n, bound.get("weight"), bound.get("bias"), None, None, mu.ndim - 2, n_jac, n_var,
                          state.shape)
    return advance(state, step, ctx)


@register_rule(torch.nn.functional.group_norm, torch.group_norm)
def group_norm_op_rule(op: Callable[..., Any], args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """F.group_norm with a fixed weight and bias: the nn.GroupNorm rule."""
    bound = {k: _mean_of(v) for k, v in (dict(zip(_GROUP_NORM_ARGS, args, strict=False)) | kwargs).items()}
    state = args[0]
    if not isinstance(state, Moments):
        raise UnsupportedOpError("group_norm of a random input with a fixed weight and bias")
    return _group_norm(state, int(bound["num_groups"]), bound.get("weight"), bound.get("bias"), None, None,
                       float(bound.get("eps", 1e-5)), ctx)


__all__ = ["conv1d_as_linear", "conv1d_rule", "group_norm_op_rule", "groupnorm_rule", "hf_conv1d_rule",
           "layer_norm_op_rule"]
