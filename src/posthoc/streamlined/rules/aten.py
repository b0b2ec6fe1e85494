"""Rules for the aten ops of a torch.export graph (:mod:`posthoc.streamlined.exported`): adapters onto the op rules.

Export records ops as aten overloads (``aten.view.default``, ``aten.gelu.default``, ...). Each is registered here
in the one registry and handed to the existing rule with the torch function whose arguments it has, so no maths is
repeated: re-indexing (view, reshape, transpose, permute, (un)squeeze, select, slice, expand, index, gather, dtype
casts) to :func:`.ops.reindex_rule`; activations to :func:`.ops.activation_op_rule`; dropout to
:func:`.ops.dropout_op_rule`; scaled_dot_product_attention, softmax and matmul to :mod:`.attention`; cat, sums and
means to :mod:`.ops`, split / chunk / unbind and expand_as to :mod:`.attention`; a functional layer_norm to :func:`.layers.layer_norm_op_rule`; aten.linear and aten.addmm
with fixed weights (a module without a rule calling F.linear) to the Linear rule on a stand-in layer. add, sub, mul
and div are registered with :mod:`.ops`'s arithmetic rules there (the full-mode residual join reads those tuples).

Random weights do not reach these rules: the exported walk folds every module with a rule back into one call
(Linear, Embedding, LayerNorm, transformers' Conv1D, ...), and a random parameter read by an op outside such a
module is refused by the walk. Also here: a module rule for transformers' NewGELUActivation (GPT-2's tanh GELU,
which export writes as a polynomial with a product of two activations), keyed by name so transformers is not
imported.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from posthoc.streamlined.moments import Moments
from posthoc.streamlined.rules.activations import activation_rule
from posthoc.streamlined.rules.affine import linear_rule
from posthoc.streamlined.rules.attention import like_rule, matmul_rule, sdpa_rule, softmax_rule, split_rule
from posthoc.streamlined.rules.base import RULES, Context, register_rule
from posthoc.streamlined.rules.layers import layer_norm_op_rule
from posthoc.streamlined.rules.ops import (
    UnsupportedOpError,
    activation_op_rule,
    cat_rule,
    constant_like_rule,
    dropout_op_rule,
    pooling_op_rule,
    reduction_rule,
    reindex_rule,
)
from posthoc.streamlined.rules.weight_cache import stand_in_linear
from posthoc.utils.registry import add_to_registry

aten = torch.ops.aten

REINDEXES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
             aten.permute.default, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
             aten.squeeze.default, aten.select.int, aten.slice.Tensor, aten.expand.default, aten.clone.default,
             aten.alias.default, aten.flatten.using_ints, aten.index.Tensor, aten.gather.default,
             aten.contiguous.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default)
register_rule(*REINDEXES)(reindex_rule)  # each a fixed linear map applied alike to means and variances
register_rule(aten.dropout.default)(dropout_op_rule)  # dropout(input, p, train): the identity when train is False
register_rule(aten.cat.default)(cat_rule)
register_rule(aten.matmul.default, aten.bmm.default, aten.mm.default)(matmul_rule)
register_rule(aten.new_zeros.default, aten.new_ones.default, aten.new_full.default, aten.zeros_like.default,
              aten.ones_like.default, aten.full_like.default)(constant_like_rule)


def _delegate(function: Callable[..., Any] | str, rule: Callable[..., Any], n_args: int | None = None) -> Callable[..., Any]:
    """A rule for an aten op that calls ``rule`` as for ``function`` (the torch function with the same arguments).

    ``n_args``: how many leading positional arguments the torch function takes (the rest are aten-only flags).
    """

    def aten_rule(op: Callable[..., Any], args: tuple, kwargs: dict, ctx: Context) -> Any:
        return rule(function, args if n_args is None else args[:n_args], kwargs, ctx)

    aten_rule.__doc__ = f"The aten form of {getattr(function, '__name__', function)}: :func:`{rule.__name__}`."
    return aten_rule


_DELEGATED: tuple[tuple[Any, Callable[..., Any] | str, Callable[..., Any], int | None], ...] = (
    (aten.relu.default, F.relu, activation_op_rule, None),
    (aten.relu_.default, F.relu, activation_op_rule, None),  # the new value; the rule never writes in place
    (aten.gelu.default, F.gelu, activation_op_rule, None),  # approximate= kept
    (aten.silu.default, F.silu, activation_op_rule, None),
    (aten.tanh.default, torch.tanh, activation_op_rule, None),
    (aten.sigmoid.default, torch.sigmoid, activation_op_rule, None),
    (aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention, sdpa_rule, None),
    (aten._softmax.default, torch.softmax, softmax_rule, 2),  # (input, dim, half_to_float)
    (aten.softmax.int, torch.softmax, softmax_rule, 2),
    (aten.expand_as.default, "expand_as", like_rule, None),
    (aten.split.Tensor, torch.split, split_rule, None),
    (aten.split_with_sizes.default, torch.split, split_rule, None),
    (aten.chunk.default, torch.chunk, split_rule, None),
    (aten.unbind.int, torch.unbind, split_rule, None),
    (aten.sum.dim_IntList, torch.sum, reduction_rule, None),
    (aten.mean.dim, torch.mean, reduction_rule, None),
    (aten.layer_norm.default, F.layer_norm, layer_norm_op_rule, 5),  # (..., eps, cudnn_enable)
    (aten.adaptive_avg_pool2d.default, F.adaptive_avg_pool2d, pooling_op_rule, None),
    (aten.avg_pool2d.default, F.avg_pool2d, pooling_op_rule, None),
    (aten.max_pool2d.default, F.max_pool2d, pooling_op_rule, None),
)
for _op, _function, _rule, _n_args in _DELEGATED:
    register_rule(_op)(_delegate(_function, _rule, _n_args))


@register_rule(aten._assert_tensor_metadata.default)
def assert_metadata_rule(op: Callable[..., Any], args: tuple, kwargs: dict, ctx: Context) -> None:
    """Export's dtype/shape assertion on an activation: checked on the mean, no value (as the op returns none)."""
    op(args[0].mean if isinstance(args[0], Moments) else args[0], *args[1:], **kwargs)


@register_rule(aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int)
def shape_rule(op: Callable[..., Any], args: tuple, kwargs: dict, ctx: Context) -> Any:
    """A shape query on an activation (a batch size read for a view): read from the mean, a plain value."""
    return op(args[0].mean if isinstance(args[0], Moments) else args[0], *args[1:], **kwargs)


def _stand_in_linear(weight: torch.Tensor, bias: object) -> nn.Linear:
    """An nn.Linear holding fixed ``weight`` (D_out, D_in) and ``bias`` (a tensor or None): the Linear rule's layer."""
    if isinstance(weight, Moments) or isinstance(bias, Moments):
        raise UnsupportedOpError("linear with a weight or bias computed from an activation (a product of two "
                                 "activations); register a rule for the module that contains it (register_rule)")
    return stand_in_linear(weight, bias if isinstance(bias, torch.Tensor) else None)


@register_rule(aten.linear.default)
def linear_op_rule(op: Callable[..., Any], args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """aten.linear(x, W, b) with fixed W, b (a module without a rule calling F.linear): the Linear rule, O(its).

    A random W or b never arrives here (the walk refuses a random parameter read outside a module rule).
    """
    state, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(state, Moments):
        raise UnsupportedOpError("linear of a fixed input with a random weight")
    return linear_rule(_stand_in_linear(weight, bias), state, ctx, False)


@register_rule(aten.addmm.default)
def addmm_op_rule(op: Callable[..., Any], args: tuple, kwargs: dict, ctx: Context) -> Moments:
    """aten.addmm(b, x, W) = x W + b with fixed W (D_in, D_out) and b, x (B, D_in) random: the Linear rule with Wᵀ.

    Raises UnsupportedOpError for ``beta``/``alpha`` other than 1 or a random W.
    """
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        raise UnsupportedOpError("addmm with beta or alpha other than 1")
    bias, state, weight = args
    if not isinstance(state, Moments):
        raise UnsupportedOpError("addmm of a fixed input with a random weight")
    return linear_rule(_stand_in_linear(weight.T, bias), state, ctx, False)


def new_gelu_rule(module: nn.Module, state: Moments, ctx: Context, last: bool) -> Moments:
    """Transformers' NewGELUActivation (GPT-2's "gelu_new"): GELU's tanh form, the nn.GELU(approximate="tanh") rule."""
    return activation_rule(nn.GELU(approximate="tanh"), state, ctx, last)


# keyed by the class's registry key (rule_key of transformers.activations.NewGELUActivation): no transformers import
add_to_registry(RULES, "module transformers.activations.NewGELUActivation", new_gelu_rule, "moment-propagation rule")

__all__ = ["REINDEXES", "addmm_op_rule", "assert_metadata_rule", "linear_op_rule", "new_gelu_rule", "shape_rule"]
