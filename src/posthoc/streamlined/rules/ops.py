"""Rules for the ``call_function`` / ``call_method`` nodes of a traced graph (:mod:`posthoc.streamlined.traced`).

An op rule is ``rule(op, args, kwargs, ctx)``: ``op`` the node's target (a function, or a tensor-method name), the
arguments as the node had them with every activation given as :class:`Moments` (the traced path only calls a rule
when at least one of them is random; ops on deterministic values run on the means). It returns Moments, or a plain
value for shape queries. Approximations, as in the module rules: a sum of two random activations drops their
covariance in diagonal mode (the authors' residual rule); in full mode the traced walk joins them itself with their
cross-covariance (:mod:`posthoc.streamlined.joint`). A product of two random activations, and in full mode a cat of
several, are refused; element-wise activations are linearised at the mean. Ops on the batch axis (indexing it,
reducing over it, concatenating along it) are refused.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn

from posthoc.streamlined.moments import Moments, add_optional
from posthoc.streamlined.rules.activations import activation_rule
from posthoc.streamlined.rules.base import Context, Step, UnsupportedLayerError, advance, register_rule
from posthoc.streamlined.rules.pooling import avgpool_rule, maxpool_rule, pooled_variance

TensorMap = Callable[[torch.Tensor], torch.Tensor]


class UnsupportedOpError(UnsupportedLayerError):
    """An op of a traced graph has no rule, or its rule cannot take these arguments."""


def is_random(value: object) -> bool:
    """Whether ``value`` is an activation carrying a variance or covariance."""
    return isinstance(value, Moments) and (value.var is not None or value.cov is not None)


def _op_name(op: Callable[..., Any] | str) -> str:
    return op if isinstance(op, str) else getattr(op, "__name__", repr(op))


def _mean_of(value: object) -> Any:
    return value.mean if isinstance(value, Moments) else value


def _apply(op: Callable[..., Any] | str, args: tuple, kwargs: dict) -> Any:
    """Run ``op`` on plain values: a method name is called on ``args[0]``."""
    if isinstance(op, str):
        return getattr(args[0], op)(*args[1:], **kwargs)
    return op(*args, **kwargs)


class MapStep(Step):
    """A fixed linear map of the activations: J applied to each direction by ``torch.vmap``; variances by ``var_fn``.

    ``fn`` acts on (B, *in_shape) tensors (as the op in the model does, so e.g. ``view(x.size(0), -1)`` works);
    the diagonal-mode ``var_fn`` must give the output variances of independent inputs.
    """

    def __init__(self, fn: TensorMap, state: Moments, var_fn: TensorMap) -> None:
        self.fn, self.var_fn = fn, var_fn
        self.mean = fn(state.mean)

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        """J on directions (B, N, *in_shape) -> (B, N, *out_shape): the map on each of the N directions."""
        return torch.vmap(self.fn, in_dims=1, out_dims=1)(directions)

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        """Output variances (B, *out_shape) from the input variances, None stays None."""
        return None if var_in is None else self.var_fn(var_in)


def _check_keeps_batch(fn: TensorMap, state: Moments, what: str, key: Hashable | None = None) -> None:
    """Raise unless the linear ``fn`` keeps the batch axis: every example's output comes from that example alone.

    Two probes of the activation's size: ones, and example i filled with i + 1. A map that keeps the examples
    apart gives, for the second, (i + 1) times its output on the first in row i; a map that reads another row in
    any example (a batch mean, a permutation, ``h - h[perm]``) does not. In half precision, whose rounding would
    hide that, the probe is example 0 set to ones, the rest zero, which must move nowhere else. Cost: the probes'
    passes through ``fn`` (for attention's value product, products as large as the op's). ``key`` (see
    :func:`call_key`): a description of the call that determines the answer; a key that passed once is not
    probed again.
    """
    if key is not None and key in _KEEPS_BATCH:
        return
    mean = state.mean
    if mean.ndim == 0:
        raise UnsupportedOpError(f"{what} takes a random activation without a batch axis (shape ())")
    if torch.finfo(mean.dtype).eps > 1e-4:
        probe = torch.zeros_like(mean)
        probe[0] = 1
        out = fn(probe)
        problem = out.ndim == 0 or out.shape[0] != mean.shape[0] or bool(out[1:].any())
    else:
        weights = torch.arange(1, mean.shape[0] + 1, dtype=mean.dtype, device=mean.device)
        ones = torch.ones_like(mean)  # the activation's layout, which views and reshapes may depend on
        out_ones = fn(ones)
        out = fn(ones * weights.reshape(-1, *[1] * (mean.ndim - 1)))
        problem = out.ndim == 0 or out.shape != out_ones.shape or out.shape[0] != mean.shape[0]
        if not problem:
            expected = out_ones * weights.reshape(-1, *[1] * (out.ndim - 1))
            tolerance = 64 * torch.finfo(mean.dtype).eps * (float(expected.abs().max()) + 1.0)
            problem = bool(((out - expected).abs() > tolerance).any())
    if problem:
        raise UnsupportedOpError(f"{what} mixes or indexes the batch axis (input {tuple(mean.shape)}, output "
                                 f"{tuple(out.shape)}); the propagation keeps examples independent")
    if key is not None:
        if len(_KEEPS_BATCH) >= _KEEPS_BATCH_MAX:
            _KEEPS_BATCH.clear()
        _KEEPS_BATCH.add(key)


# Calls that passed the batch probe, by call_key; bounded (cleared when full: a cleared key is probed once more).
_KEEPS_BATCH: set[Hashable] = set()
_KEEPS_BATCH_MAX = 4096


class _NotConstant(Exception):
    pass


def _constant(value: object) -> Hashable:
    if isinstance(value, slice):
        return ("slice", _constant(value.start), _constant(value.stop), _constant(value.step))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_constant(v) for v in value))
    if value is None or value is Ellipsis or isinstance(value, (bool, int, float, str, torch.dtype, torch.device,
                                                                torch.memory_format, torch.layout)):
        return (type(value).__name__, value)
    raise _NotConstant


def call_key(op: Callable[..., Any] | str, state: Moments, args: tuple, kwargs: dict) -> Hashable | None:
    """A hashable key of the call: (op, its other arguments, the activation's shape and dtype), or None.

    None when an argument is not a constant (ints, slices, dtypes, ...): a tensor argument, e.g. an index computed
    from the data, may change the answer between calls. For a keyed call the output's layout is a function of the
    key alone, so whether it keeps the batch axis is too.
    """
    try:
        return (op, _constant(args), _constant(sorted(kwargs.items())), tuple(state.mean.shape), state.mean.dtype)
    except _NotConstant:
        return None


def elementwise_keeps_batch(shape: torch.Size, other: object) -> bool:
    """Whether an element-wise op of an activation of ``shape`` with a fixed ``other`` keeps the batch axis.

    True for a number, or a tensor that broadcasts to ``shape`` without enlarging it (no probe needed).
    """
    if not isinstance(other, torch.Tensor):
        return isinstance(other, (int, float, bool))
    try:
        return other.ndim <= len(shape) and torch.broadcast_shapes(other.shape, shape) == shape
    except RuntimeError:
        return False


def matmul_keeps_batch(random: torch.Size, fixed: torch.Size, random_left: bool) -> bool:
    """Whether ``random @ fixed`` (``fixed @ random`` when not ``random_left``) keeps the batch axis, by shapes.

    The random operand's axis 0 must be a batch axis of the product (or, on the left, its rows) with the fixed
    operand's batch axes broadcasting into the random one's. False means "probe", not "mixes".
    """
    if len(random) < (2 if random_left else 3):
        return False  # axis 0 is contracted (a vector, or the right operand's rows)
    if len(fixed) <= 2:
        return True
    try:
        return len(fixed) <= len(random) and torch.broadcast_shapes(fixed[:-2], random[:-2]) == random[:-2]
    except RuntimeError:
        return False


def _linear_map(state: Moments, fn: TensorMap, var_fn: TensorMap, ctx: Context, what: str,
                key: Hashable | None = None, keeps_batch: bool = False) -> Moments:
    """A fixed linear map as a step; ``keeps_batch``: the caller proved the batch axis kept, else it is probed."""
    if not keeps_batch:
        _check_keeps_batch(fn, state, what, key)
    return advance(state, MapStep(fn, state, var_fn), ctx)


def _unary(op: Callable[..., Any] | str, args: tuple, kwargs: dict) -> tuple[Moments, TensorMap]:
    """The random first argument and the op as a map of it (every other argument a fixed value)."""
    state, rest = args[0], tuple(_mean_of(a) for a in args[1:])
    if not isinstance(state, Moments) or any(is_random(a) for a in args[1:]) or any(map(is_random, kwargs.values())):
        raise UnsupportedOpError(f"{_op_name(op)} is supported with one random activation as its first argument")
    fixed = {k: _mean_of(v) for k, v in kwargs.items()}
    return state, lambda t: _apply(op, (t, *rest), fixed)


RESHAPES = ("reshape", "view", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "clone",
            torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
            operator.getitem)


@register_rule(*RESHAPES)
def reindex_rule(op: Callable[..., Any] | str, args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """Re-indexing (reshape, view, flatten, permute, transpose, getitem, ...): means and variances re-indexed alike.

    getitem of a tuple of activations (the parts of a split) picks the part.
    """
    if op is operator.getitem and isinstance(args[0], (tuple, list)):
        return args[0][_mean_of(args[1])]
    state, fn = _unary(op, args, kwargs)
    return _linear_map(state, fn, fn, ctx, _op_name(op), key=call_key(op, state, args[1:], kwargs))


@register_rule("mean", "sum", torch.mean, torch.sum)
def reduction_rule(op: Callable[..., Any] | str, args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """Sum / mean over feature axes; diagonal mode by ``ctx.pooling`` (:func:`.pooling.pooled_variance`)."""
    state, fn = _unary(op, args, kwargs)
    name = _op_name(op)
    divisor = 1 if name == "sum" else state.mean[0].numel() // max(fn(state.mean[:1]).numel(), 1)
    return _linear_map(state, fn, pooled_variance(fn, divisor, ctx.pooling), ctx, name,
                       key=call_key(op, state, args[1:], kwargs))


def _split_operands(args: tuple, kwargs: dict, what: str) -> tuple[object, object]:
    if len(args) != 2 or set(kwargs) - {"alpha"}:
        raise UnsupportedOpError(f"{what} with arguments {len(args)} positional, {sorted(kwargs)} keyword")
    return args[0], args[1]


# the aten overloads are torch.export's (posthoc.streamlined.exported)
ADDS = (operator.add, operator.iadd, torch.add, "add", "add_", torch.ops.aten.add.Tensor,
        torch.ops.aten.add_.Tensor)
SUBS = (operator.sub, operator.isub, torch.sub, "sub", "sub_", torch.ops.aten.sub.Tensor,
        torch.ops.aten.sub_.Tensor)


@register_rule(*ADDS, *SUBS)
def add_rule(op: Callable[..., Any] | str, args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """A ± αb: means combined by the op (never in place); variances added.

    Two random operands (a residual join): diagonal mode adds the variances, dropping Cov(a, b) (the authors'
    residual rule); in full mode the traced walk adds Cov(a, b) itself (:func:`posthoc.streamlined.joint.join`),
    so this rule raises UnsupportedOpError if called with two in full mode. A fixed operand only shifts the mean.
    """
    subtract = op in SUBS
    a, b = _split_operands(args, kwargs, _op_name(op))
    alpha = kwargs.get("alpha", 1)
    mean = (operator.sub if subtract else operator.add)(_mean_of(a), _mean_of(b) if alpha == 1 else
                                                        alpha * _mean_of(b))
    if is_random(a) and is_random(b):
        assert isinstance(a, Moments) and isinstance(b, Moments)
        if ctx.full:
            raise UnsupportedOpError(f"{_op_name(op)} of two random activations in full mode needs their "
                                     "cross-covariance (the traced walk's join, posthoc.streamlined.joint)")
        var = add_optional(a.var, None if b.var is None else b.var * float(alpha) ** 2)
        return Moments(mean, var=None if var is None else var.expand_as(mean))
    state = a if is_random(a) else b
    assert isinstance(state, Moments)
    coefficient = (-float(alpha) if subtract else float(alpha)) if state is b else 1.0  # c - αh: -α
    if state.cov is not None or state.crosses:
        if mean.shape != state.mean.shape:
            raise UnsupportedOpError(f"{_op_name(op)} broadcasts a random activation {tuple(state.mean.shape)} to "
                                     f"{tuple(mean.shape)} in full mode")
        scale = coefficient**2
        return Moments(mean, cov=None if state.cov is None else state.cov * scale,
                       crosses=[c * coefficient for c in state.crosses])
    return Moments(mean, var=None if state.var is None else (state.var * coefficient**2).expand_as(mean))


MULS = (operator.mul, operator.imul, torch.mul, "mul", "mul_", torch.ops.aten.mul.Tensor,
        torch.ops.aten.mul_.Tensor)
DIVS = (operator.truediv, operator.itruediv, torch.div, "div", "div_", torch.ops.aten.div.Tensor,
        torch.ops.aten.div_.Tensor)


@register_rule(*MULS, *DIVS)
def scale_rule(op: Callable[..., Any] | str, args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """A random activation times / divided by a constant or a deterministic tensor (broadcast): var times c².

    UnsupportedOpError for a product of two random activations, or a random divisor.
    """
    if kwargs:
        raise UnsupportedOpError(f"{_op_name(op)} with keyword arguments {sorted(kwargs)}")
    a, b = _split_operands(args, {}, _op_name(op))
    if is_random(a) and is_random(b):
        raise UnsupportedOpError(f"{_op_name(op)} of two random activations (a product of Gaussians); register a "
                                 "rule for the module that contains it (register_rule)")
    divide = op in DIVS
    if divide and is_random(b):
        raise UnsupportedOpError(f"{_op_name(op)} by a random activation")
    state, factor = (a, _mean_of(b)) if is_random(a) else (b, _mean_of(a))
    assert isinstance(state, Moments)
    coefficient = 1 / factor if divide else factor

    def fn(t: torch.Tensor) -> torch.Tensor:
        return t / factor if divide else t * factor

    return _linear_map(state, fn, lambda v: v * coefficient * coefficient, ctx, _op_name(op),
                       keeps_batch=elementwise_keeps_batch(state.mean.shape, factor))


@register_rule(torch.cat, torch.concat)
def cat_rule(op: Callable[..., Any], args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """Concatenation along a feature axis: means and variances concatenated (fixed parts: zero variance).

    Full mode takes one random part only (UnsupportedOpError otherwise: their cross-covariance is not tracked).
    """
    parts = list(args[0])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    means = [_mean_of(p) for p in parts]
    mean = op(means, dim)
    if dim % mean.ndim == 0:
        raise UnsupportedOpError("cat along the batch axis")
    random = [i for i, p in enumerate(parts) if is_random(p)]
    if not ctx.full:
        variances = [p.var if is_random(p) and p.var is not None else torch.zeros_like(m)
                     for p, m in zip(parts, means, strict=True)]
        return Moments(mean, var=op(variances, dim))
    if len(random) > 1:
        raise UnsupportedOpError("cat of several random activations in full mode: the traced path does not track "
                                 "their cross-covariance; use activation_covariance='diagonal'")
    k = random[0]
    state = parts[k]
    assert isinstance(state, Moments)

    def fn(t: torch.Tensor) -> torch.Tensor:  # a direction of part k embedded in the output (zeros elsewhere)
        return op([t if i == k else torch.zeros_like(m) for i, m in enumerate(means)], dim)

    step = MapStep(fn, state, fn)
    step.mean = mean
    return advance(state, step, ctx)


_ACTIVATIONS: dict[str, Callable[[dict], nn.Module]] = {
    "relu": lambda kw: nn.ReLU(),
    "gelu": lambda kw: nn.GELU(approximate=kw.get("approximate", "none")),
    "silu": lambda kw: nn.SiLU(),
    "tanh": lambda kw: nn.Tanh(),
    "sigmoid": lambda kw: nn.Sigmoid(),
}


@register_rule(torch.relu, F.relu, "relu", F.gelu, F.silu, torch.tanh, F.tanh, "tanh", torch.sigmoid, F.sigmoid,
               "sigmoid")
def activation_op_rule(op: Callable[..., Any] | str, args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """Functional forms of ReLU, GELU (``approximate`` kept), SiLU, tanh, sigmoid: the module rule (linearised)."""
    state = args[0]
    if not isinstance(state, Moments) or len(args) > 1 or set(kwargs) - {"approximate", "inplace"}:
        raise UnsupportedOpError(f"{_op_name(op)} with arguments other than the activation (and approximate)")
    return activation_rule(_ACTIVATIONS[_op_name(op)](kwargs), state, ctx, False)


@register_rule(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout)
def dropout_op_rule(op: Callable[..., Any], args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """Dropout at test time: the identity (ValueError if the traced call has training=True, F.dropout's default)."""
    training = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
    if training:
        raise ValueError(f"{_op_name(op)} is called with training=True in the traced forward; Streamlined predicts "
                         "with dropout off (pass training=self.training)")
    state = args[0]
    assert isinstance(state, Moments)
    return state


@register_rule(F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d)
def pooling_op_rule(op: Callable[..., Any], args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """Functional 2-D pooling: the module rules of AdaptiveAvgPool2d, AvgPool2d and MaxPool2d with the same arguments."""
    state = args[0]
    assert isinstance(state, Moments)
    settings = tuple(_mean_of(a) for a in args[1:])
    if op is F.adaptive_avg_pool2d:
        return avgpool_rule(nn.AdaptiveAvgPool2d(*settings, **kwargs), state, ctx, False)
    if op is F.avg_pool2d:
        return avgpool_rule(nn.AvgPool2d(*settings, **kwargs), state, ctx, False)
    if kwargs.get("return_indices", False):
        raise UnsupportedOpError("max_pool2d with return_indices=True")
    return maxpool_rule(nn.MaxPool2d(*settings, **kwargs), state, ctx, False)


_SHAPE_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim"})


@register_rule("size", "dim", getattr)
def shape_query_rule(op: Callable[..., Any] | str, args: tuple, kwargs: dict, ctx: Context) -> Any:
    """x.size(), x.dim(), x.shape / dtype / device / ndim: read from the mean (a plain value, not an activation)."""
    if op is getattr and args[1] not in _SHAPE_ATTRIBUTES:
        raise UnsupportedOpError(f"attribute {args[1]!r} of a random activation")
    return _apply(op, tuple(_mean_of(a) for a in args), kwargs)


@register_rule(torch.zeros_like, torch.ones_like, torch.full_like, "new_zeros", "new_ones", "new_full")
def constant_like_rule(op: Callable[..., Any] | str, args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """A constant tensor shaped like an activation (zeros_like, new_ones, ...): deterministic, no variance."""
    return Moments(_apply(op, tuple(_mean_of(a) for a in args), {k: _mean_of(v) for k, v in kwargs.items()}))
