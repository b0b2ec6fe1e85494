"""Rules for the ops of attention on traced graphs: matmul / bmm, softmax, scaled_dot_product_attention.

The paper's attention rule, op by op: the attention weights are computed from the means (Q and K deterministic, so
a matmul of two random activations, the scores Q Kᵀ, gives the product of the means with no variance), and the
values V are random (A V with A fixed is linear in V: exact). Softmax of a random input, which the scores rule never
produces, is linearised through its Jacobian at the mean, J = diag(s) - s sᵀ along ``dim``.

``attention="linearized"`` (full mode) drops the means-only rule: the traced walk stacks the operands of a
scaled_dot_product_attention with a random query or key, or of a matmul of two random activations, with their
cross-covariances (:func:`joint_operands`, :func:`posthoc.streamlined.joint.stack_operands`) and applies the op's
Jacobian at the means to the joint covariance (:func:`linearised_joint`, :func:`attention_jvp`): exact to first
order.

``attention="shared_value"`` in diagonal mode keeps the cross-token covariance that the one random value projection
W_v gives all tokens. An op rule sees only the values' variances, so the graph is prepared first
(:func:`attach_value_sources`): each scaled_dot_product_attention whose value is an nn.Linear or transformers'
Conv1D output re-indexed into heads (view, transpose, split, slice, a cat with an empty key/value cache...) is given
that projection, its input and where each value entry sits in the projection's output (the re-indexing replayed on
an index tensor); the rule then propagates the projection and the mixing together (:func:`shared_value_attention`).
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from posthoc.streamlined.moments import Moments, add_optional
from posthoc.streamlined.rules.affine import _affine_noise, linear_rule
from posthoc.streamlined.rules.base import AttentionRule, Context, Step, advance, find_rule, register_rule
from posthoc.streamlined.rules.layers import conv1d_as_linear, hf_conv1d_rule
from posthoc.streamlined.rules.ops import (
    MapStep,
    UnsupportedOpError,
    _check_keeps_batch,
    _linear_map,
    _mean_of,
    _op_name,
    call_key,
    elementwise_keeps_batch,
    is_random,
    matmul_keeps_batch,
    reindex_rule,
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
                           _op_name(op), keeps_batch=matmul_keeps_batch(a.mean.shape, right.shape, True))
    left = _mean_of(a)
    assert isinstance(b, Moments)
    return _linear_map(b, lambda t: torch.matmul(left, t), lambda v: torch.matmul(left.square(), v), ctx,
                       _op_name(op), keeps_batch=matmul_keeps_batch(b.mean.shape, left.shape, False))


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

    if not isinstance(dim, int) or dim % state.mean.ndim == 0:  # any other axis keeps the examples apart
        _check_keeps_batch(jvp, state, "softmax")
    step = MapStep(jvp, state, var_fn)
    step.mean = s  # the map is the Jacobian at the mean; the mean itself is softmax(μ)
    return advance(state, step, ctx)


@register_rule("masked_fill", torch.masked_fill, torch.ops.aten.masked_fill.Scalar)
def masked_fill_rule(op: Callable[..., Any] | str, args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """x.masked_fill(mask, value) with x random, the mask and value fixed: exact (linear).

    The filled entries become the constant (no variance), the others pass through: masked attention scores written
    out (Hugging Face's "eager" attention).
    """
    names = ("input", "mask", "value")
    bound = dict(zip(names, args, strict=False)) | kwargs
    state, mask, value = (bound.get(name) for name in names)
    if not isinstance(state, Moments) or is_random(mask) or is_random(value) or mask is None or value is None:
        raise UnsupportedOpError(f"{_op_name(op)} with a random mask or fill value")
    mask, value = _mean_of(mask), _mean_of(value)

    def fn(t: torch.Tensor) -> torch.Tensor:
        return t.masked_fill(mask, 0)

    if not elementwise_keeps_batch(state.mean.shape, mask):
        _check_keeps_batch(fn, state, _op_name(op))
    step = MapStep(fn, state, fn)
    step.mean = state.mean.masked_fill(mask, value)
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
# The keyword :func:`attach_value_sources` gives a scaled_dot_product_attention node: its values' projection.
VALUE_SOURCE = "_streamlined_value_source"


def attention_of_projection(*args: Any, **kwargs: Any) -> torch.Tensor:
    """F.scaled_dot_product_attention, the ``VALUE_SOURCE`` keyword left out (:func:`attach_value_sources`' target).

    A graph given value sources by :func:`attach_value_sources` still computes the model's output when run.
    """
    kwargs.pop(VALUE_SOURCE, None)
    return F.scaled_dot_product_attention(*args, **kwargs)


def _bound_sdpa(args: tuple, kwargs: dict) -> dict[str, Any]:
    """A scaled_dot_product_attention call's arguments by name; UnsupportedOpError for dropout_p > 0 or enable_gqa."""
    bound = dict(zip(_SDPA_ARGS, args, strict=False)) | kwargs
    if float(bound.get("dropout_p", 0.0)) != 0.0 or bound.get("enable_gqa", False):
        raise UnsupportedOpError("scaled_dot_product_attention with dropout_p > 0 or enable_gqa; predict with "
                                 "dropout off (dropout_p=0.0 when not training)")
    return bound


def _fixed_mask(bound: dict[str, Any]) -> torch.Tensor | None:
    """The call's attn_mask as a plain tensor (None without one); UnsupportedOpError for a random mask."""
    mask = bound.get("attn_mask")
    if is_random(mask):
        raise UnsupportedOpError("scaled_dot_product_attention with a random attn_mask")
    return _mean_of(mask)


@register_rule(F.scaled_dot_product_attention, attention_of_projection)
def sdpa_rule(op: Callable[..., Any], args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """F.scaled_dot_product_attention: weights A from the means of Q and K (and the mask), output A V, exact in V.

    Masks (boolean: True keeps; float: added to the scores) and ``is_causal`` as torch applies them; the mask is
    deterministic. Diagonal mode: Var = A² Var(V) (tokens independent, the authors' rule), or with
    ``attention="shared_value"`` :func:`shared_value_attention` on the values' projection (given by
    :func:`attach_value_sources`); full mode J Σ_V Jᵀ. Raises UnsupportedOpError for dropout_p > 0, enable_gqa, a
    random mask, or ``attention="shared_value"`` on values that are not a projection's output re-indexed. Cost:
    one attention on the means plus one A² V product.
    """
    bound = _bound_sdpa(args, kwargs)
    source = bound.pop(VALUE_SOURCE, None)
    shared_value = not ctx.full and ctx.attention is AttentionRule.SHARED_VALUE
    if shared_value and source is None:
        raise UnsupportedOpError("attention='shared_value' on scaled_dot_product_attention needs its value to be "
                                 "the output of an nn.Linear or transformers' Conv1D re-indexed into heads (view, "
                                 "transpose, split, slice), so that the shared random W_v is known; this value is "
                                 "computed otherwise: pass attention='independent', or activation_covariance='full'")
    weights = _attention_weights(_mean_of(bound["query"]), _mean_of(bound["key"]), _fixed_mask(bound),
                                 bool(bound.get("is_causal", False)), bound.get("scale"))
    value = bound["value"]
    if shared_value:
        return shared_value_attention(weights, _mean_of(value), source, ctx)
    if not is_random(value):
        return Moments(weights @ _mean_of(value))
    return _linear_map(value, lambda t: weights @ t, lambda v: weights.square() @ v, ctx,
                       "scaled_dot_product_attention",
                       keeps_batch=matmul_keeps_batch(value.mean.shape, weights.shape, False))


class JointStep(Step):
    """A map of several jointly Gaussian operands linearised at their means (full mode only).

    The operands are stacked flat per example (B, Σ D_i) in the order of ``shapes`` (each operand's feature shape);
    ``jvp(*directions)`` maps the operands' directions (B, N, *shape_i) to the output's (B, N, *out_shape).
    """

    def __init__(self, mean: torch.Tensor, shapes: list[tuple[int, ...]], jvp: Callable[..., torch.Tensor]) -> None:
        self.mean, self.shapes, self.jvp = mean, shapes, jvp
        self.sizes = [math.prod(shape) for shape in shapes]

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        """J on directions (B, N, Σ D_i) -> (B, N, *out_shape)."""
        batch, n = directions.shape[:2]
        parts = directions.reshape(batch, n, -1).split(self.sizes, -1)
        return self.jvp(*(p.reshape(batch, n, *shape) for p, shape in zip(parts, self.shapes, strict=True)))

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        """Not defined: the operands' cross-covariances are needed (diagonal mode has none)."""
        raise UnsupportedOpError("a map of several random operands needs their cross-covariances: "
                                 "activation_covariance='full'")


def attention_jvp(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, weights: torch.Tensor, scale: float,
                  d_query: torch.Tensor, d_key: torch.Tensor, d_value: torch.Tensor) -> torch.Tensor:
    """d(A V) for A = softmax(Q Kᵀ·scale + mask) at the means, on directions (B, N, ..., L|S, E) of Q, K and V.

    dS = scale (dQ K̄ᵀ + Q̄ dKᵀ), dA = A ⊙ (dS - Σ_s A dS) (zero where A is, so masked positions stay masked),
    d out = dA V̄ + A dV. Means (B, ..., L|S, E) and ``weights`` (B, ..., L, S). Cost: four attention-sized
    products per direction.
    """
    query, key, value, weights = (t.unsqueeze(1) for t in (query, key, value, weights))
    d_scores = (d_query @ key.transpose(-2, -1) + query @ d_key.transpose(-2, -1)) * scale
    d_weights = weights * (d_scores - (weights * d_scores).sum(-1, keepdim=True))
    return d_weights @ value + weights @ d_value


def joint_operands(target: Any, node_args: tuple, node_kwargs: dict, args: tuple, kwargs: dict
                   ) -> list[tuple[Any, Any]] | None:
    """The operands ``attention="linearized"`` linearises jointly at an op, as (graph node, value) pairs, or None.

    scaled_dot_product_attention with a random query or key: (query, key, value); a matmul of two random
    operands (attention scores Q Kᵀ written out): both. None where the op's own rule applies (exact there).
    """
    if target in _SDPA_TARGETS:
        bound, nodes = dict(zip(_SDPA_ARGS, args, strict=False)) | kwargs, \
            dict(zip(_SDPA_ARGS, node_args, strict=False)) | node_kwargs
        if not (is_random(bound.get("query")) or is_random(bound.get("key"))):
            return None
        return [(nodes.get(name), bound.get(name)) for name in ("query", "key", "value")]
    if target in MATMULS and len(args) == 2 and not kwargs and is_random(args[0]) and is_random(args[1]):
        return [(node_args[0], args[0]), (node_args[1], args[1])]
    return None


def linearised_joint(target: Any, args: tuple, kwargs: dict, stacked: Moments, shapes: list[tuple[int, ...]],
                     ctx: Context) -> Moments:
    """The op of :func:`joint_operands` linearised in all its operands (full mode, ``attention="linearized"``).

    ``stacked``: the operands' joint moments, flat per example in their order (:func:`posthoc.streamlined.joint.
    stack_operands`); ``shapes`` their feature shapes. The mean is the op on the means (= model(x)). Raises
    UnsupportedOpError for dropout_p > 0, enable_gqa or a random mask. Cost: the map on Σ D_i + D_out directions
    per example.
    """
    if target in MATMULS:
        a, b = _mean_of(args[0]), _mean_of(args[1])
        if a.ndim < 3 or b.ndim < 3:
            raise UnsupportedOpError("a matmul of two random activations needs both batched (B, ..., M, N)")

        def matmul_jvp(d_a: torch.Tensor, d_b: torch.Tensor) -> torch.Tensor:
            return d_a @ b.unsqueeze(1) + a.unsqueeze(1) @ d_b

        return advance(stacked, JointStep(a @ b, shapes, matmul_jvp), ctx)
    bound = _bound_sdpa(args, kwargs)
    mask = _fixed_mask(bound)
    query, key, value = (_mean_of(bound[name]) for name in ("query", "key", "value"))
    scale = bound.get("scale")
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    weights = _attention_weights(query, key, mask, bool(bound.get("is_causal", False)), scale)
    jvp = functools.partial(attention_jvp, query, key, value, weights, scale)
    return advance(stacked, JointStep(weights @ value, shapes, jvp), ctx)


@dataclass
class ValueSource:
    """Where the values of one attention come from, for the "shared_value" rule.

    ``projection`` (nn.Linear or transformers' Conv1D) applied to ``input`` (B, S, D_in); ``index`` (the values'
    shape): 1 + s·D_out + j for the projection output entry (s, j) each value entry is (0: none).
    """

    projection: nn.Module
    input: Moments | torch.Tensor
    index: torch.Tensor


def value_index(projection_output: Moments | torch.Tensor) -> torch.Tensor:
    """(B, *shape) int64: 1 + the flat position of each entry within its example (0 is kept for "no entry")."""
    mean = _mean_of(projection_output)
    per_example = torch.arange(1, mean[0].numel() + 1, device=mean.device).reshape(mean.shape[1:])
    return per_example.expand(mean.shape).contiguous()


def value_source(projection_input: Moments | torch.Tensor, index: Moments | torch.Tensor, projection: nn.Module
                 ) -> ValueSource:
    """The :class:`ValueSource` of an attention (the node :func:`attach_value_sources` inserts)."""
    return ValueSource(projection, projection_input, _mean_of(index))


@register_rule(value_index, value_source)
def value_source_rule(op: Callable[..., Any], args: tuple, kwargs: dict, ctx: Context) -> Any:
    """:func:`value_index` and :func:`value_source` of random activations: plain values, no moments propagated."""
    return op(*args, **kwargs)


_SDPA_TARGETS = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
_SPLITS = (torch.split, torch.chunk, torch.unbind, "split", "chunk", "unbind", torch.ops.aten.split.Tensor,
           torch.ops.aten.split_with_sizes.default, torch.ops.aten.chunk.default, torch.ops.aten.unbind.int)
_CATS = (torch.cat, torch.concat, torch.ops.aten.cat.default)


def _is_projection(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    module = graph_module.get_submodule(str(node.target))
    return find_rule(type(module)) in (linear_rule, hf_conv1d_rule)


def _value_chain(graph_module: fx.GraphModule, node: object) -> tuple[fx.Node, list[fx.Node]] | None:
    """The projection node ``node`` re-indexes the output of, and the re-indexing nodes from it in graph order.

    None if ``node`` is not a projection's output re-indexed (a cat counts where exactly one part is).
    """
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        return (node, []) if node.args and _is_projection(graph_module, node) else None
    if node.op not in ("call_function", "call_method") or not node.args:
        return None
    if node.target in _CATS:
        parts = [f for f in (_value_chain(graph_module, part) for part in node.args[0]) if f is not None]  # type: ignore[union-attr]
        return (parts[0][0], [*parts[0][1], node]) if len(parts) == 1 else None
    if find_rule(node.target) is reindex_rule or node.target in _SPLITS:
        found = _value_chain(graph_module, node.args[0])
        return None if found is None else (found[0], [*found[1], node])
    return None


def _copied(copies: dict[fx.Node, fx.Node], node: fx.Node) -> fx.Node:
    return copies.get(node, node)


def attach_value_sources(graph_module: fx.GraphModule, ctx: Context) -> None:
    """Give each scaled_dot_product_attention of a traced graph its values' projection, for "shared_value".

    Only in diagonal mode with ``attention="shared_value"`` (else nothing changes). Where the value is an nn.Linear
    or transformers' Conv1D output re-indexed (:func:`_value_chain`), nodes are inserted before the attention:
    :func:`value_index` of the projection's output, the same re-indexing applied to it, and :func:`value_source`
    (its input, the index, the projection module read by a ``get_attr`` node), passed to the attention, which
    becomes :func:`attention_of_projection`, as ``VALUE_SOURCE``. Other attentions are left as they are (their rule
    raises, naming the fix). Idempotent. Cost: one pass over the graph; at propagation, one index tensor the size
    of each projection's output.
    """
    if ctx.full or ctx.attention is not AttentionRule.SHARED_VALUE:
        return
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA_TARGETS:
            continue
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
        found = _value_chain(graph_module, value)
        if found is None:
            continue
        projection, chain = found
        with graph.inserting_before(node):
            copies = {projection: graph.call_function(value_index, (projection,))}
            for link in chain:
                copies[link] = graph.node_copy(link, functools.partial(_copied, copies))
            module = graph.get_attr(str(projection.target))  # the projection module itself, read as an attribute
            source = graph.call_function(value_source, (projection.args[0], copies[chain[-1] if chain else projection],
                                                        module))
        node.target = attention_of_projection  # the same attention, taking the keyword
        node.kwargs = {**node.kwargs, VALUE_SOURCE: source}


def _value_columns(index: torch.Tensor, value_shape: tuple[int, ...], tokens: int, width: int) -> torch.Tensor:
    """The projection output column j (*heads, 1, E_v) of each value feature, from the values' index.

    Checked to be the same for every example and token, with value token s = projection token s. Raises
    UnsupportedOpError otherwise.
    """
    if index.is_floating_point():  # a cat with a floating (empty) cache promoted the index
        if tokens * width + 1 > 2 / torch.finfo(index.dtype).eps:  # the largest exactly held integer
            raise UnsupportedOpError("attention='shared_value': the value index lost precision in "
                                     f"{index.dtype}; pass attention='independent'")
        index = index.round().long()
    index = index - 1
    if tuple(index.shape) != value_shape or len(value_shape) < 3 or bool((index < 0).any()):
        raise UnsupportedOpError("attention='shared_value' needs every value entry to be one of the projection's "
                                 "outputs (no cached or constant rows): pass attention='independent'")
    token, column = index // width, index % width
    positions = torch.arange(value_shape[-2], device=index.device).unsqueeze(-1)
    first = column[:1, ..., :1, :]
    if value_shape[-2] != tokens or not bool((token == positions).all()) or not bool((column == first).all()):
        raise UnsupportedOpError("attention='shared_value' needs the values' token axis (-2) to be the projection's "
                                 "and each value feature one projection column for all tokens (a head split): "
                                 "pass attention='independent'")
    return first[0]


def shared_value_attention(weights: torch.Tensor, value_mean: torch.Tensor, source: ValueSource, ctx: Context
                           ) -> Moments:
    """A V in diagonal mode keeping the cross-token covariance of the shared random projection W_v.

    V = R(W_v a + b) for the projection input a (B, S, D_in) and a head split R; per value feature (column j):
    Var(out_t) = Σ_s A_ts² [W̄² σ²_s + Var(δW)·σ²_s]_j + Var(δW ā_t + δb)_j with ā_t = Σ_s A_ts μ_s, as
    :func:`posthoc.streamlined.rules.multihead.shared_value_variance` (the weight noise on the input means is one draw
    for all tokens; input variances stay token-independent). ``weights`` (B, *heads, T, S), ``value_mean``
    (B, *heads, S, E_v). Cost: the projection's variance pass, and per head one A μ product and the weight noise on
    it (a diagonal posterior: only the head's own columns).
    """
    projection = source.projection
    linear, linear_ctx = ((projection, ctx) if isinstance(projection, nn.Linear)
                          else conv1d_as_linear(projection, ctx))
    state = source.input if isinstance(source.input, Moments) else Moments(source.input)
    mu = state.mean
    if mu.ndim != 3:
        raise UnsupportedOpError(f"attention='shared_value' needs the value projection's input as (B, S, D_in), "
                                 f"got {tuple(mu.shape)}: pass attention='independent'")
    batch, tokens, width = mu.shape[0], mu.shape[1], linear.out_features
    columns = _value_columns(source.index, tuple(value_mean.shape), tokens, width)  # (*heads, 1, E_v)
    lead = (1,) * (value_mean.ndim - 3)  # the head axes
    noise = _affine_noise(linear, linear_ctx)
    var = None
    if state.var is not None:
        per_token = F.linear(state.var, linear.weight.square())
        if noise is not None:
            per_token = per_token + noise.from_input(state.var)
        per_value = torch.take_along_dim(per_token.reshape(batch, *lead, tokens, width), columns.unsqueeze(0), -1)
        var = weights.square() @ per_value
    if noise is not None:
        attended = weights @ mu.reshape(batch, *lead, tokens, -1)  # ā (B, *heads, T, D_in)
        if noise.w_diag is not None:  # Σ_k Var(W_jk) ā_k² + Var(b_j) for the head's own columns only
            shared = attended.square() @ noise.w_diag[columns.squeeze(-2)].transpose(-1, -2)
            if noise.b_var is not None:
                shared = shared + noise.b_var[columns]
        else:
            shared = torch.take_along_dim(noise.shared(attended), columns.unsqueeze(0), -1)
        var = add_optional(var, shared)
    return Moments(weights @ value_mean, var=var)


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
    return _linear_map(state, lambda t: getattr(t, op)(target), lambda v: getattr(v, op)(target), ctx, op,
                       key=call_key(op, state, (tuple(target.shape),), {}))
