"""Moment-propagation rules, one per layer type, in a registry new layers plug into.

A rule maps (module, input :class:`Moments`, :class:`Context`) to output Moments. Most
rules build a :class:`Step` (the layer linearised at the input mean) and call
:func:`advance`, which applies it in the chosen mode:

- diagonal mode: ``step.var(var_in)``, the output variances (weight noise included);
- full mode: Σ_out = J Σ_in Jᵀ + ``step.noise_full(Σ_in)`` (the weight-noise covariance,
  cross-unit and cross-position terms included), and J applied to every open
  cross-covariance (residual blocks).

Weights are independent of the incoming activations (they belong to different layers),
so for Linear/Conv2d layers the moments are exact given Gaussian inputs; the only
approximations are the linearisation of nonlinear layers at the mean (activations,
LayerNorm, attention weights) and, in diagonal mode, the dropped covariances.

The rules live by layer family (:mod:`.affine`: Linear, Conv2d; :mod:`.activations`: element-wise
activations, Identity, Dropout, Flatten; :mod:`.pooling`; :mod:`.normalisation`: BatchNorm, LayerNorm;
:mod:`.embedding`: Embedding; :mod:`.layers`: Conv1d, transformers' Conv1D, GroupNorm, functional layer_norm /
group_norm) on the core in :mod:`.base`, with the rules for the ops of traced graphs in :mod:`.ops` and
:mod:`.attention` (matmul, softmax, scaled_dot_product_attention, split), :mod:`.multihead` (multi-head attention with Q
and K from the mean: nn.MultiheadAttention and posthoc's block), and their aten forms for torch.export
graphs in :mod:`.aten`; importing this package
registers them all in the one registry :data:`RULES` (keyed by module type, function or tensor-method name).
Residual and attention blocks need no rule of their own: their forward is traced into these (posthoc's attention
block and positional embedding keep one, :mod:`.posthoc_blocks`).
"""

from __future__ import annotations

from posthoc.streamlined.rules import aten as _aten  # noqa: F401  (registers torch.export's aten op rules)
from posthoc.streamlined.rules import attention as _attention  # noqa: F401  (registers the attention op rules)
from posthoc.streamlined.rules import multihead as _multihead  # noqa: F401  (registers nn.MultiheadAttention's)
from posthoc.streamlined.rules import posthoc_blocks as _posthoc_blocks  # noqa: F401  (posthoc's attention, positions)
from posthoc.streamlined.rules.activations import ElementwiseStep, activation_rule, flatten_rule, identity_rule
from posthoc.streamlined.rules.affine import AffineNoise, ConvStep, LinearStep, conv2d_rule, linear_rule
from posthoc.streamlined.rules.base import (
    RULES,
    ActivationRule,
    AttentionRule,
    Context,
    LayerNormRule,
    PoolingRule,
    Rule,
    Step,
    UnsupportedLayerError,
    advance,
    find_rule,
    register_rule,
    rule_key,
)
from posthoc.streamlined.rules.embedding import embedding_rule
from posthoc.streamlined.rules.layers import conv1d_rule, groupnorm_rule, hf_conv1d_rule
from posthoc.streamlined.rules.normalisation import AffineNormStep, batchnorm_rule, layernorm_rule
from posthoc.streamlined.rules.ops import UnsupportedOpError
from posthoc.streamlined.rules.pooling import LinearMapStep, MaxPoolStep, avgpool_rule, maxpool_rule

__all__ = [
    "RULES",
    "AffineNoise",
    "AffineNormStep",
    "AttentionRule",
    "Context",
    "ConvStep",
    "ElementwiseStep",
    "LayerNormRule",
    "ActivationRule",
    "LinearMapStep",
    "LinearStep",
    "MaxPoolStep",
    "PoolingRule",
    "Rule",
    "Step",
    "UnsupportedLayerError",
    "UnsupportedOpError",
    "activation_rule",
    "advance",
    "avgpool_rule",
    "batchnorm_rule",
    "conv1d_rule",
    "conv2d_rule",
    "embedding_rule",
    "flatten_rule",
    "groupnorm_rule",
    "hf_conv1d_rule",
    "identity_rule",
    "layernorm_rule",
    "linear_rule",
    "maxpool_rule",
    "find_rule",
    "register_rule",
    "rule_key",
]
