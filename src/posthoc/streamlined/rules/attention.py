"""Rules for the ops of attention on traced graphs: matmul / bmm, softmax, scaled_dot_product_attention.

The paper's attention rule, op by op: the attention weights are computed from the means (Q and K deterministic, so
a matmul of two random activations, the scores Q Kᵀ, gives the product of the means with no variance), and the
values V are random (A V with A fixed is linear in V: exact). Softmax of a random input, which the scores rule never
produces, is linearised through its Jacobian at the mean, J = diag(s) - s sᵀ along ``dim``.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F

from posthoc.streamlined.moments import Moments
from posthoc.streamlined.rules.base import AttentionRule, Context, advance, register_rule
from posthoc.streamlined.rules.ops import (
    MapStep,
    UnsupportedOpError,
    _check_keeps_batch,
    _linear_map,
    _mean_of,
    _op_name,
    is_random,
)

MATMULS = (torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm")


@register_rule(*MATMULS)
def matmul_rule(op: Callable[..., Any] | str, args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """A @ B: linear in the one random operand (exact); two random operands are attention scores, from the means.

    One random operand: diagonal mode Var(a @ B) = Var(a) @ B² (and A² @ Var(b)); full mode J Σ Jᵀ. Two random
    operands (Q Kᵀ): the product of the means, deterministic, as the streamlining paper takes Q and K from the mean
    (their variance is dropped; only V carries weight noise through attention). Cost: two matmuls of the op's size.
    """
    if kwargs or len(args) != 2:
        raise UnsupportedOpError(f"{_op_name(op)} with arguments {len(args)} positional, {sorted(kwargs)} keyword")
    a, b = args
    if is_random(a) and is_random(b):
        return Moments(torch.matmul(_mean_of(a), _mean_of(b)))
    if is_random(a):
        right = _mean_of(b)
        return _linear_map(a, lambda t: torch.matmul(t, right), lambda v: torch.matmul(v, right.square()), ctx,
                           _op_name(op))
    left = _mean_of(a)
    assert isinstance(b, Moments)
    return _linear_map(b, lambda t: torch.matmul(left, t), lambda v: torch.matmul(left.square(), v), ctx,
                       _op_name(op))


@register_rule(torch.softmax, F.softmax, "softmax")
def softmax_rule(op: Callable[..., Any] | str, args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """Softmax linearised at the mean: J = diag(s) - s sᵀ along ``dim``.

    Diagonal mode: Var_j = s_j² [(1 - 2 s_j) v_j + Σ_i s_i² v_i], O(D). ``dtype`` is honoured for the mean.
    """
    state = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if not isinstance(state, Moments) or dim is None or set(kwargs) - {"dim", "dtype", "_stacklevel"}:
        raise UnsupportedOpError(f"{_op_name(op)} needs a random activation and an explicit dim")
    s = torch.softmax(state.mean, dim, dtype=kwargs.get("dtype"))

    def jvp(t: torch.Tensor) -> torch.Tensor:
        return s * (t - (s * t).sum(dim, keepdim=True))

    def var_fn(v: torch.Tensor) -> torch.Tensor:
        return s.square() * ((1 - 2 * s) * v + (s.square() * v).sum(dim, keepdim=True))

    _check_keeps_batch(jvp, state, "softmax")
    step = MapStep(jvp, state, var_fn)
    step.mean = s  # the map is the Jacobian at the mean; the mean itself is softmax(μ)
    return advance(state, step, ctx)


def _attention_weights(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                       scale: float | None) -> torch.Tensor:
    """softmax(Q Kᵀ · scale + mask) (..., L, S), as F.scaled_dot_product_attention computes it."""
    scores = query @ key.transpose(-2, -1) * (1 / math.sqrt(query.shape[-1]) if scale is None else scale)
    if causal:
        length, source = scores.shape[-2:]
        keep = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, -1)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@register_rule(F.scaled_dot_product_attention)
def sdpa_rule(op: Callable[..., Any], args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """F.scaled_dot_product_attention: weights A from the means of Q and K (and the mask), output A V, exact in V.

    Masks (boolean: True keeps; float: added to the scores) and ``is_causal`` as torch applies them; the mask is
    deterministic. Diagonal mode: Var = A² Var(V) (tokens independent, the authors' rule); full mode J Σ_V Jᵀ.
    Raises UnsupportedOpError for dropout_p > 0, enable_gqa, a random mask, or ``attention="shared_value"`` in
    diagonal mode (that rule needs the value projection, which is a separate node here). Cost: one attention on the means
    plus one A² V product.
    """
    bound = dict(zip(_SDPA_ARGS, args, strict=False)) | kwargs
    if float(bound.get("dropout_p", 0.0)) != 0.0 or bound.get("enable_gqa", False):
        raise UnsupportedOpError("scaled_dot_product_attention with dropout_p > 0 or enable_gqa; predict with "
                                 "dropout off (dropout_p=0.0 when not training)")
    if not ctx.full and ctx.attention is AttentionRule.SHARED_VALUE:
        raise UnsupportedOpError("attention='shared_value' is a rule of the attention modules (posthoc's "
                                 "MultiHeadSelfAttention, torch's nn.MultiheadAttention); "
                                 "scaled_dot_product_attention on traced projections takes the independent-token "
                                 "rule: pass attention='independent', or activation_covariance='full'")
    mask = bound.get("attn_mask")
    if is_random(mask):
        raise UnsupportedOpError("scaled_dot_product_attention with a random attn_mask")
    weights = _attention_weights(_mean_of(bound["query"]), _mean_of(bound["key"]), _mean_of(mask),
                                 bool(bound.get("is_causal", False)), bound.get("scale"))
    value = bound["value"]
    if not is_random(value):
        return Moments(weights @ _mean_of(value))
    return _linear_map(value, lambda t: weights @ t, lambda v: weights.square() @ v, ctx,
                       "scaled_dot_product_attention")


@register_rule(torch.chunk, torch.split, torch.unbind, "chunk", "split", "unbind")
def split_rule(op: Callable[..., Any] | str, args: tuple, kwargs: dict, ctx: Context) -> tuple[Moments, ...]:
    """Chunk / split / unbind of a random activation (e.g. a fused QKV projection): each part re-indexed.

    Diagonal mode only: in full mode the parts' cross-covariance would be lost once they are separate nodes, so
    UnsupportedOpError names the fix (index the parts with getitem / slicing, which the full mode tracks).
    """
    state = args[0]
    if not isinstance(state, Moments) or any(is_random(a) for a in args[1:]):
        raise UnsupportedOpError(f"{_op_name(op)} with a random argument other than the first")
    if ctx.full:
        raise UnsupportedOpError(f"{_op_name(op)} of a random activation in full mode; slice the parts with "
                                 "x[..., a:b] instead, or use activation_covariance='diagonal'")
    rest = tuple(_mean_of(a) for a in args[1:])
    fixed = {k: _mean_of(v) for k, v in kwargs.items()}

    def parts(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        function = getattr(torch, op) if isinstance(op, str) else op
        return tuple(function(t, *rest, **fixed))

    means = parts(state.mean)
    dim = int(rest[-1] if len(rest) > (0 if _op_name(op) == "unbind" else 1) else fixed.get("dim", 0))
    if dim % state.mean.ndim == 0:
        raise UnsupportedOpError(f"{_op_name(op)} along the batch axis")
    if state.var is None:
        return tuple(Moments(m) for m in means)
    return tuple(Moments(m, var=v) for m, v in zip(means, parts(state.var), strict=True))


@register_rule("expand_as")
def like_rule(op: str, args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """t.expand_as(x): a random ``t`` broadcast (linear); a random ``x`` lends its shape only."""
    target = _mean_of(args[1])
    if not is_random(args[0]):
        return Moments(getattr(_mean_of(args[0]), op)(target))
    state = args[0]
    assert isinstance(state, Moments)
    return _linear_map(state, lambda t: getattr(t, op)(target), lambda v: getattr(v, op)(target), ctx, op)
