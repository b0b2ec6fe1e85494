"""Multi-head attention with Q and K from the mean and V random: posthoc's block and torch's nn.MultiheadAttention.

The streamlining paper's attention rule: the attention weights A (B, H, T, S) are computed from the mean input and
the mean weights (the posterior of the query and key projections is not used), and the output
out_proj(merge_heads(A · split_heads(v_proj(value)))) is then linear in the random values, so it is propagated
exactly given A: the value projection's weight noise (diagonal, Kronecker or full layer posterior), the mixing
over tokens per head, then the output projection's weight noise. :func:`attend_values` is that computation, shared
by posthoc's :class:`~posthoc.models.vit.MultiHeadSelfAttention` (four ``nn.Linear``) and
``nn.MultiheadAttention`` (:func:`multihead_attention_rule`), whose value projection is the rows 2E:3E of the fused
``in_proj_weight`` (3E, E) and ``in_proj_bias``: their posterior is read for those rows (:func:`value_posterior`).

nn.MultiheadAttention is called with several inputs (query, key, value, masks) and returns a tuple: the traced walk
passes a module rule the call's further arguments when its signature takes them, and :func:`fold_multihead_calls`
rewrites the traced graph so the module's node is its attention output (the ``[0]`` read) and, for
``batch_first=False``, folds the batch transposes around the call into it (the walk keeps the batch on axis 0).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from posthoc.streamlined.moments import Moments, add_optional, rearrange
from posthoc.streamlined.rules.affine import LinearStep, _affine_noise, linear_rule
from posthoc.streamlined.rules.attention import JointStep, attention_jvp
from posthoc.streamlined.rules.base import (
    AttentionRule,
    Context,
    Step,
    UnsupportedLayerError,
    advance,
    find_rule,
    register_rule,
)
from posthoc.streamlined.rules.layers import _with_stand_in
from posthoc.streamlined.rules.ops import UnsupportedOpError, _mean_of, is_random
from posthoc.streamlined.rules.weight_cache import stand_in_linear
from posthoc.streamlined.weight_posteriors import KronFactor, LayerPosterior

# The marker the fold puts on a batch_first=False call whose (N, L, E) <-> (L, N, E) transposes it folded in.
BATCH_FIRST_FOLDED = "_streamlined_batch_first"


class AttentionMixStep(Step):
    """out_t = Σ_s A_ts v_s per head, A (B, H, T, S) fixed; values (B, S, H·d) -> output (B, T, H·d).

    Head h reads features h·d … (h+1)·d − 1 (the split of posthoc's and torch's attention). Cost O(B H T S d).
    """

    def __init__(self, n_heads: int, weights: torch.Tensor, v_mean: torch.Tensor) -> None:
        self.n_heads, self.weights = n_heads, weights
        self.mean = self._mix(v_mean, weights)

    def _mix(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        lead, (s, width) = x.shape[:-2], x.shape[-2:]
        heads = x.reshape(*lead, s, self.n_heads, width // self.n_heads).transpose(-3, -2)  # (..., H, S, d)
        return (weights @ heads).transpose(-3, -2).reshape(*lead, -1, width)

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        """J on directions (B, N, S, D) -> (B, N, T, D): the attention-weighted sums over tokens per head."""
        return self._mix(directions, self.weights.unsqueeze(1))

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        """Output variances: Σ_s A_ts² var_s per head (tokens independent), None stays None."""
        return None if var_in is None else self._mix(var_in, self.weights.square())


def shared_value_variance(v_proj: nn.Linear, n_heads: int, value: Moments, weights: torch.Tensor,
                          ctx: Context) -> torch.Tensor | None:
    """Diagonal-mode variances (B, T, D) of A · v_proj(value) keeping the cross-token covariance of the shared W_v.

    Var(out_tj) = Σ_s A_ts² [W̄² σ²_s + Var(δW)·σ²_s]_j + Var(δW ā_t + δb)_j with ā_t = Σ_s A_ts μ_s (per head):
    the weight noise acting on the input means is the same for all tokens, so it acts on the attention-averaged
    mean; input variances stay token-independent. Cost: the value projection's variance pass plus one per head.
    """
    noise = _affine_noise(v_proj, ctx)
    head_dim = v_proj.out_features // n_heads
    var = None
    if value.var is not None:
        per_token = torch.nn.functional.linear(value.var, v_proj.weight.square())
        if noise is not None:
            per_token = per_token + noise.from_input(value.var)
        var = AttentionMixStep(n_heads, weights, LinearStep(v_proj, value, ctx).mean).var(per_token)
    if noise is not None:
        b, h, t, _ = weights.shape
        attended = weights @ value.mean.unsqueeze(1)  # (B, H, T, D_in)
        shared = noise.shared(attended).reshape(b, h, t, h, head_dim)  # (B, H, T, H', d)
        shared = torch.diagonal(shared, dim1=1, dim2=3).permute(0, 1, 3, 2)  # head h's own features
        var = add_optional(var, shared.reshape(b, t, h * head_dim))
    return var


def _linear(layer: nn.Linear, state: Moments, ctx: Context, last: bool) -> Moments:
    """The registered rule of the layer's type (nn.Linear's, also for torch's NonDynamicallyQuantizableLinear)."""
    return (find_rule(type(layer)) or linear_rule)(layer, state, ctx, last)


def attend_values(value: Moments, weights: torch.Tensor, v_proj: nn.Linear, out_proj: nn.Linear, n_heads: int,
                  ctx: Context, last: bool, value_ctx: Context | None = None) -> Moments:
    """out_proj(merge_heads(A · split_heads(v_proj(value)))) for fixed attention weights A (B, H, T, S).

    ``value`` (B, S, D_in) may be random or not; ``value_ctx`` is the context whose posterior holds the value
    projection's (a stand-in layer's, see :func:`value_posterior`), default ``ctx``. Diagonal mode:
    ``attention="independent"`` Σ_o,t = Σ_s A_ts² Σ_v,s (the authors' rule) or ``"shared_value"``
    (:func:`shared_value_variance`); full mode carries the complete cross-token covariance of v (the shared W_v
    included) through the mixing. Cost: two projections and one mixing, each in the mode's cost.
    """
    value_ctx = ctx if value_ctx is None else value_ctx
    if not ctx.full and ctx.attention is AttentionRule.SHARED_VALUE:
        mix = AttentionMixStep(n_heads, weights, v_proj(value.mean))
        mixed = Moments(mix.mean, var=shared_value_variance(v_proj, n_heads, value, weights, value_ctx))
    else:
        v = _linear(v_proj, value, value_ctx, False)
        mixed = advance(v, AttentionMixStep(n_heads, weights, v.mean), ctx)
    return _linear(out_proj, mixed, ctx, last)


class StackedStep(Step):
    """Layers reading one input, their outputs stacked on a new feature axis: (B, P, *out_shape) (full mode).

    Each layer's weights are independent of the others', so the weight noise is block-diagonal across the parts;
    the input's covariance correlates them through the stacked Jacobian.
    """

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.mean = torch.stack([step.mean for step in steps], 1)

    @property
    def has_noise(self) -> bool:
        """Whether any of the layers is random."""
        return any(step.has_noise for step in self.steps)

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        """J on directions (B, N, *in_shape) -> (B, N, P, *out_shape)."""
        return torch.stack([step.jac(directions) for step in self.steps], 2)

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        """Not used: the stacked parts are for a joint (full-mode) linearisation."""
        raise UnsupportedOpError("stacked projections are propagated in full mode only")

    def noise_full(self, cov_in: torch.Tensor | None) -> torch.Tensor | None:
        """The layers' weight-noise covariances on the block diagonal (B, P·D, P·D), or None."""
        blocks = [step.noise_full(cov_in) for step in self.steps]
        if all(block is None for block in blocks):
            return None
        batch, width = self.mean.shape[0], int(self.mean[0, 0].numel())
        out = self.mean.new_zeros(batch, len(blocks) * width, len(blocks) * width)
        for i, block in enumerate(blocks):
            if block is not None:
                out[:, i * width:(i + 1) * width, i * width:(i + 1) * width] = block
        return out


def linearised_self_attention(qkv: Moments, n_heads: int, scale: float, out_proj: nn.Linear, ctx: Context,
                              last: bool, weights: torch.Tensor | None = None) -> Moments:
    """out_proj(merge_heads(softmax(Q Kᵀ·scale + mask) V)) linearised in Q, K and V (``attention="linearized"``).

    ``qkv`` (B, 3, T, E): the queries, keys and values with their joint full covariance (the shared input's and
    the projections' noise); heads split as posthoc's and torch's attention do (head h: features h·d … (h+1)·d − 1).
    ``weights`` (B, H, T, T): the attention weights at the means with any mask applied (default: unmasked, from
    the means of Q and K). Cost: the attention map on 3·T·E + T·E directions per example, then out_proj's
    full-mode rule.
    """
    tokens, width = qkv.mean.shape[2:]
    head = width // n_heads

    def split(x: torch.Tensor) -> torch.Tensor:  # (..., T, E) -> (..., H, T, d)
        return x.reshape(*x.shape[:-2], tokens, n_heads, head).transpose(-3, -2)

    def merge(x: torch.Tensor) -> torch.Tensor:  # (..., H, T, d) -> (..., T, E)
        return x.transpose(-3, -2).reshape(*x.shape[:-3], tokens, width)

    query, key, value = (split(part) for part in qkv.mean.unbind(1))
    if weights is None:
        weights = torch.softmax(query @ key.transpose(-2, -1) * scale, -1)

    def jvp(d_query: torch.Tensor, d_key: torch.Tensor, d_value: torch.Tensor) -> torch.Tensor:
        return merge(attention_jvp(query, key, value, weights, scale, split(d_query), split(d_key), split(d_value)))

    mixed = advance(qkv, JointStep(merge(weights @ value), [(tokens, width)] * 3, jvp), ctx)
    return _linear(out_proj, mixed, ctx, last)


def _value_rows(module: nn.MultiheadAttention) -> tuple[str, str | None, slice]:
    """The attributes holding the value projection's weight and bias, and their rows for V."""
    e = module.embed_dim
    if module._qkv_same_embed_dim:
        return "in_proj_weight", None if module.in_proj_bias is None else "in_proj_bias", slice(2 * e, 3 * e)
    return "v_proj_weight", None if module.in_proj_bias is None else "in_proj_bias", slice(None)


def value_projection(module: nn.MultiheadAttention) -> nn.Linear:
    """The value projection of an nn.MultiheadAttention as a stand-in nn.Linear(vdim, E) (a copy of its weights)."""
    weight_attr, bias_attr, rows = _value_rows(module)
    bias = module.in_proj_bias[2 * module.embed_dim:] if bias_attr is not None else None
    return stand_in_linear(getattr(module, weight_attr)[rows], bias)


def value_posterior(module: nn.MultiheadAttention, post: LayerPosterior | None) -> LayerPosterior | None:
    """The posterior of the value rows of an nn.MultiheadAttention's projection, as a stand-in Linear's.

    Diagonal: the variances of rows 2E:3E; Kronecker (a factor over the whole (3E, E) in_proj_weight): the rows
    2E:3E of its output basis, Cov(vec W_v) = (Q_G[V] ⊗ Q_A) diag(D) (Q_G[V] ⊗ Q_A)ᵀ, exact; full: the V block of
    the layer's dense covariance. The query and key rows are dropped (Q and K are taken from the mean). Returns
    None when the value projection is deterministic.
    """
    weight_attr, bias_attr, rows = _value_rows(module)
    e = module.embed_dim
    return _rows_posterior(module, post, weight_attr, bias_attr, rows, slice(2 * e, 3 * e))


def in_projection(module: nn.MultiheadAttention, post: LayerPosterior | None
                  ) -> tuple[nn.Linear, LayerPosterior | None]:
    """The fused query/key/value projection of an nn.MultiheadAttention as a stand-in nn.Linear(E, 3E), with a posterior.

    The posterior is ``post`` (the module's) read for all the projection's rows (diagonal, Kronecker or full: the
    rows' correlations kept). Needs the fused ``in_proj_weight`` (kdim = vdim = embed_dim).
    """
    bias = module.in_proj_bias
    rows = slice(None)
    return (stand_in_linear(module.in_proj_weight, bias),
            _rows_posterior(module, post, "in_proj_weight", None if bias is None else "in_proj_bias", rows, rows))


def _rows_posterior(module: nn.MultiheadAttention, post: LayerPosterior | None, weight_attr: str,
                    bias_attr: str | None, rows: slice, bias_rows: slice) -> LayerPosterior | None:
    """The posterior of some rows of an nn.MultiheadAttention's projection, as a stand-in Linear's.

    Rows ``rows`` of ``weight_attr`` and ``bias_rows`` of ``bias_attr`` become the stand-in's "weight" and "bias";
    None when they are deterministic.
    """
    if post is None:
        return None
    stand_in = LayerPosterior()
    for attr, name, attr_rows in ((weight_attr, "weight", rows), (bias_attr, "bias", bias_rows)):
        if attr is None:
            continue
        if attr in post.diag:
            stand_in.diag[name] = post.diag[attr][attr_rows]
        elif attr in post.kron:
            factor = post.kron[attr]
            stand_in.kron[name] = KronFactor(factor.q_out[attr_rows], factor.q_in, factor.inv)
    if post.full is not None:
        attrs, cov = post.full
        offset, index, names = 0, [], []
        for attr in attrs:
            parameter = getattr(module, attr)
            if attr in (weight_attr, bias_attr):
                positions = torch.arange(parameter.numel(), device=cov.device).reshape(parameter.shape)
                index.append(offset + positions[rows if attr == weight_attr else bias_rows].reshape(-1))
                names.append("weight" if attr == weight_attr else "bias")
            offset += parameter.numel()
        if index:
            rows_v = torch.cat(index)
            stand_in.full = (names, cov[rows_v][:, rows_v])
    return None if stand_in.is_empty else stand_in


def _check_supported(module: nn.MultiheadAttention, batch_first_folded: bool) -> None:
    if module.bias_k is not None or module.bias_v is not None:
        raise UnsupportedLayerError("nn.MultiheadAttention with add_bias_kv=True is not supported by Streamlined "
                                    "(the learned key/value bias rows); build it with add_bias_kv=False")
    if module.add_zero_attn:
        raise UnsupportedLayerError("nn.MultiheadAttention with add_zero_attn=True is not supported by Streamlined; "
                                    "build it with add_zero_attn=False")
    if not module.batch_first and not batch_first_folded:
        raise UnsupportedOpError("nn.MultiheadAttention with batch_first=False takes (L, N, E) inputs, and "
                                 "Streamlined keeps the batch on axis 0: its inputs must be the batch transposes "
                                 "x.transpose(0, 1) (or x.permute(1, 0, 2)) of (N, L, E) activations, and its "
                                 "output read [0] then transposed back, as the traced walk folds them; or build the "
                                 "module with batch_first=True")


def _as_state(value: object, what: str) -> Moments:
    if isinstance(value, Moments):
        return value
    if isinstance(value, torch.Tensor):
        return Moments(value)
    raise UnsupportedOpError(f"nn.MultiheadAttention's {what} must be a tensor, got {type(value).__name__}")


def _deterministic(value: object, what: str) -> torch.Tensor | None:
    if is_random(value):
        raise UnsupportedOpError(f"nn.MultiheadAttention with a random {what}; masks must be deterministic")
    return _mean_of(value)


@register_rule(nn.MultiheadAttention)
def multihead_attention_rule(module: nn.MultiheadAttention, query: Moments, ctx: Context, last: bool,
                             key: Moments | torch.Tensor | None = None, value: Moments | torch.Tensor | None = None,
                             key_padding_mask: Any = None, need_weights: bool = True, attn_mask: Any = None,
                             average_attn_weights: bool = True, is_causal: bool = False,
                             **marker: bool) -> Moments:
    """nn.MultiheadAttention(query, key, value, ...): A from the means of query and key, output linear in value.

    Called as a one-input module rule (self-attention: key and value are the query), or with the call's arguments
    by the traced walk. The masks (``key_padding_mask``, ``attn_mask``, ``is_causal``) are applied by torch's own
    module on the means, so their semantics are torch's; they must be deterministic. ``need_weights`` and
    ``average_attn_weights`` do not change the output (the weights are not propagated; the traced walk refuses a
    read of them). The value projection's posterior (rows 2E:3E of in_proj_weight / in_proj_bias, or
    v_proj_weight) and out_proj's may be diagonal, Kronecker or full; the query and key rows' is not used (Q and K
    from the mean, the paper's rule). Inputs (B, L, E) (``batch_first=True``, or a folded batch_first=False call).
    Raises UnsupportedLayerError for add_bias_kv / add_zero_attn, UnsupportedOpError for batch_first=False
    outside the folded pattern or a random mask. Cost: the attention weights from the means (without masks, the
    query and key projections only; with masks, one forward of the module) plus :func:`attend_values`.
    """
    if set(marker) - {BATCH_FIRST_FOLDED}:
        raise UnsupportedOpError(f"nn.MultiheadAttention called with unknown arguments {sorted(marker)}")
    batch_first_folded = bool(marker.get(BATCH_FIRST_FOLDED, False))
    _check_supported(module, batch_first_folded)
    query = _as_state(query, "query")
    key_state = query if key is None else _as_state(key, "key")
    value_state = query if value is None else _as_state(value, "value")
    crosses = next((s.crosses for s in (query, key_state) if s.crosses), [])
    if crosses and not value_state.crosses:  # full mode, a fixed value: the output is independent of the live nodes
        value_state = Moments(value_state.mean, cov=value_state.cov,
                              crosses=[c.new_zeros(c.shape[0], value_state.dim, c.shape[2]) for c in crosses])
    key_padding_mask = _deterministic(key_padding_mask, "key_padding_mask")
    attn_mask = _deterministic(attn_mask, "attn_mask")
    if key_padding_mask is None and attn_mask is None and not is_causal and not (module.training and module.dropout):
        weights = _unmasked_weights(module, query.mean, key_state.mean)
    else:  # torch's own module applies the masks, so their semantics are torch's
        means = [s.mean for s in (query, key_state, value_state)]
        if batch_first_folded:
            means = [m.transpose(0, 1) for m in means]  # the (L, N, E) layout the module takes
        with torch.no_grad():
            _, weights = module(*means, key_padding_mask=key_padding_mask, need_weights=True, attn_mask=attn_mask,
                                average_attn_weights=False, is_causal=is_causal)
    assert weights is not None  # (B, H, T, S) with need_weights=True
    if ctx.full and ctx.attention is AttentionRule.LINEARIZED:
        return _linearised_multihead(module, query, key_state, value_state, weights, ctx, last)
    v_proj = value_projection(module)
    value_ctx = _with_stand_in(ctx, v_proj, value_posterior(module, ctx.posterior.get(module)))
    return attend_values(value_state, weights, v_proj, module.out_proj, module.num_heads, ctx, last, value_ctx)


def _unmasked_weights(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ / sqrt(d)) per head (B, H, T, S) as nn.MultiheadAttention computes it without masks.

    ``query`` (B, T, E) and ``key`` (B, S, kdim), batch first whatever the module's layout. Only the query
    and key projections run: the module's own call would also project the values and apply out_proj, which the
    rule computes again with their variances. Cost: two projections and one score product per head.
    """
    e, heads = module.embed_dim, module.num_heads
    bias = module.in_proj_bias
    b_q, b_k = (None, None) if bias is None else (bias[:e], bias[e:2 * e])
    if module._qkv_same_embed_dim:
        w_q, w_k = module.in_proj_weight[:e], module.in_proj_weight[e:2 * e]
    else:
        w_q, w_k = module.q_proj_weight, module.k_proj_weight
    with torch.no_grad():
        if key is query and module._qkv_same_embed_dim:  # self-attention: one product for Q and K
            q, k = F.linear(query, module.in_proj_weight[:2 * e], None if bias is None else bias[:2 * e]).chunk(2, -1)
        else:
            q, k = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k)
        q = q.unflatten(-1, (heads, e // heads)).transpose(1, 2)  # (B, H, T, d)
        k = k.unflatten(-1, (heads, e // heads)).transpose(1, 2)
        return torch.softmax((q * math.sqrt(1.0 / (e // heads))) @ k.transpose(-2, -1), dim=-1)


def _linearised_multihead(module: nn.MultiheadAttention, query: Moments, key: Moments, value: Moments,
                          weights: torch.Tensor, ctx: Context, last: bool) -> Moments:
    """nn.MultiheadAttention self-attention linearised in Q, K and V through its fused in_proj (full mode).

    ``weights`` (B, H, T, T): the module's attention weights on the means, its masks applied as torch applies them
    (a masked position has weight 0, so its score's variation does not reach the output).
    """
    same = all(s is query or s.mean is query.mean for s in (key, value))
    if not same or not module._qkv_same_embed_dim:
        raise UnsupportedOpError("attention='linearized' on nn.MultiheadAttention supports self-attention (query, "
                                 "key and value one activation) with the fused in_proj_weight; pass "
                                 "attention='independent' for this model")
    projection, post = in_projection(module, ctx.posterior.get(module))
    projection_ctx = _with_stand_in(ctx, projection, post)
    packed = advance(query, LinearStep(projection, query, projection_ctx), projection_ctx)  # (B, T, 3E)
    width = module.embed_dim
    qkv = rearrange(packed, lambda t: t.unflatten(-1, (3, width)).movedim(-2, 1))  # (B, 3, T, E)
    head = width // module.num_heads
    return linearised_self_attention(qkv, module.num_heads, 1 / math.sqrt(head), module.out_proj, ctx, last,
                                     weights)


_TRANSPOSES = {torch.transpose: "transpose", torch.permute: "permute", torch.ops.aten.transpose.int: "transpose",
               torch.ops.aten.permute.default: "permute"}


def _batch_transpose_source(node: object) -> fx.Node | None:
    """The (N, L, E) node a ``transpose(0, 1)`` / ``permute(1, 0, 2)`` node (fx or aten) reads, or None."""
    if not isinstance(node, fx.Node) or node.op not in ("call_method", "call_function") or node.kwargs:
        return None
    name = node.target if node.op == "call_method" else _TRANSPOSES.get(node.target)
    args = node.args
    if name == "transpose" and len(args) == 3 and {args[1], args[2]} == {0, 1}:
        return args[0] if isinstance(args[0], fx.Node) else None
    if name == "permute":
        dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        if tuple(dims) == (1, 0, 2):
            return args[0] if isinstance(args[0], fx.Node) else None
    return None


_CALL_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
              "is_causal")


def bind_call(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """An nn.MultiheadAttention call's arguments as its rule takes them: (query, key, value), the rest by name.

    ``args`` / ``kwargs`` as the forward was called (graph nodes or values); a key or value not given is None.
    """
    bound = dict(zip(_CALL_ARGS, args, strict=False)) | dict(kwargs)
    return tuple(bound.pop(name, None) for name in _CALL_ARGS[:3]), bound



def _fold_batch_transposes(graph: fx.Graph, node: fx.Node) -> None:
    """Rewrite transpose -> MHA(batch_first=False) -> transpose into one call on the (N, L, E) activations."""
    inputs = [arg for arg in node.args[:3] if arg is not None]
    sources = [_batch_transpose_source(arg) for arg in inputs]
    readers = list(node.users)
    if not inputs or any(s is None for s in sources) or not readers \
            or any(_batch_transpose_source(r) is not node for r in readers):
        return  # not the pattern: the rule raises, naming it
    transposes = [arg for arg in inputs if isinstance(arg, fx.Node)]
    node.args = (*sources, *node.args[len(inputs):])
    node.kwargs = {**node.kwargs, BATCH_FIRST_FOLDED: True}
    for reader in readers:
        reader.replace_all_uses_with(node)
        graph.erase_node(reader)
    for transpose in dict.fromkeys(transposes):
        if not transpose.users:
            graph.erase_node(transpose)


def fold_multihead_calls(graph: fx.Graph, root: nn.Module) -> None:
    """Rewrite every nn.MultiheadAttention call of a traced graph so that its node is the attention output.

    The ``[0]`` reads of its (output, weights) tuple read the node itself, an unread ``[1]`` is dropped, and the
    arguments become positional (query, key, value, then the masks by name); for ``batch_first=False``, the batch
    transposes of its inputs and of its output are folded into the call (:data:`BATCH_FIRST_FOLDED`). Raises
    UnsupportedOpError when the attention weights (``[1]``) or the tuple itself are read by another op. Cost: one
    pass over the graph.
    """
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = root.get_submodule(str(node.target))
        if type(module) is not nn.MultiheadAttention:
            continue
        node.args, node.kwargs = bind_call(tuple(node.args), dict(node.kwargs))
        for user in list(node.users):
            if user.op == "output":
                continue  # the model returns the tuple: the walk reads its first element
            index = user.args[1] if user.target is operator.getitem and len(user.args) == 2 else None
            if index == 0:
                user.replace_all_uses_with(node)
                graph.erase_node(user)
            elif index == 1 and not user.users:
                graph.erase_node(user)
            else:
                raise UnsupportedOpError(f"the output of nn.MultiheadAttention {node.target!r} is read by "
                                         f"{user.format_node()}; Streamlined propagates its attention output "
                                         "(read [0]) only, not the attention weights")
    fold_batch_transposes(graph, root)


def fold_batch_transposes(graph: fx.Graph, root: nn.Module) -> None:
    """Fold the batch transposes around each batch_first=False nn.MultiheadAttention node whose value is its output.

    The fx graph after :func:`fold_multihead_calls`, or a torch.export graph whose module calls were folded into
    ``call_module`` nodes (aten transpose / permute). Cost: one pass over the graph.
    """
    for node in list(graph.nodes):
        if node.op == "call_module":
            module = root.get_submodule(str(node.target))
            if type(module) is nn.MultiheadAttention and not module.batch_first:
                _fold_batch_transposes(graph, node)


__all__ = ["AttentionMixStep", "BATCH_FIRST_FOLDED", "StackedStep", "attend_values", "bind_call",
           "fold_batch_transposes", "fold_multihead_calls", "in_projection", "linearised_self_attention",
           "multihead_attention_rule", "shared_value_variance", "value_posterior", "value_projection"]
