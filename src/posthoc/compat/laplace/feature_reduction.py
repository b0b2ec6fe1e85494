"""laplace-torch's ``feature_reduction`` ("pick_first", "pick_last", "average") on posthoc's Laplace.

What laplace-torch 0.3 computes (``FeatureExtractor.forward_with_features``, used by its last-layer Laplace):
the last nn.Linear's INPUT features phi (B, ..., D) are reduced over their middle (position) dimensions,
position 0 ("pick_first"), position -1 ("pick_last") or the mean over all positions, padding included
("average"), then squeezed; the last-layer Jacobian is phi_reduced ⊗ I (plus I for the bias), while the mean
f_mu is the model's output and the curvature's output Hessian is taken at it. posthoc gives it two readings:

- The model returns per-position logits (B, ..., C), its head applied at every position, and the targets are
  one per example (B,): laplace-torch's last-layer function W reduce(phi) + b is then reduce(logits), since the
  head is affine and the reductions linear. posthoc reduces the model's output the same way
  (:class:`ReducedOutput`, the ``output_fn``), so Laplace covers reduce(f(x)) (B, C), for every
  ``subset_of_weights``. laplace-torch 0.3 does not fit such a model (its loss reads the unreduced (B, T, C)
  output against (B,) targets); on the same model followed by the same reduction, which it fits, its last-layer
  glm mean and variance equal posthoc's (benchmarks/feature_reduction_parity.py).
- The model already returns (B, C), pooling after its head (e.g. GPT2ForSequenceClassification at the last
  non-pad token): posthoc keeps the model's own pooling (the Jacobian of the output the model gives) and warns
  once what laplace-torch would differentiate instead (for "pick_last": position -1, a pad token in right-padded
  batches).

laplace-torch's ``.squeeze()`` also drops a batch of one (B = 1 gives (D,)); posthoc keeps the batch dimension.
"""

from __future__ import annotations

import warnings
from enum import Enum
from typing import Any, Callable

import torch
from torch import nn

from posthoc.network.inputs import ModelCall
from posthoc.utils.checks import check_choice


class FeatureReduction(str, Enum):
    """laplace-torch's ``FeatureReduction`` values (its enum, or any object with ``.value``, is accepted too)."""

    PICK_FIRST = "pick_first"
    PICK_LAST = "pick_last"
    AVERAGE = "average"


LAPLACE_TORCH_READS = {
    FeatureReduction.PICK_FIRST: "the features at position 0 (the first token)",
    FeatureReduction.PICK_LAST: "the features at position -1, which in right-padded batches is a pad token "
                                "(GPT-2 pools the last non-pad token)",
    FeatureReduction.AVERAGE: "the mean of the features over all positions, padding included",
}


def reduce_positions(outputs: torch.Tensor, reduction: FeatureReduction) -> torch.Tensor:
    """Outputs (B, ..., C) reduced over their middle dimensions to (B, C), as laplace-torch reduces features.

    "pick_first": position 0 of each middle dimension; "pick_last": position -1; "average": the mean over them.
    Outputs (B, C) come back unchanged. Cost: one index or mean.
    """
    if outputs.ndim <= 2:
        return outputs
    # positions row-major: position (0, ..., 0) is the first row, (-1, ..., -1) the last
    positions = outputs.reshape(outputs.shape[0], -1, outputs.shape[-1])
    if reduction is FeatureReduction.AVERAGE:
        return positions.mean(1)
    return positions[:, 0 if reduction is FeatureReduction.PICK_FIRST else -1]


class ReducedOutput:
    """An ``output_fn``: the model's output tensor reduced over its positions by :func:`reduce_positions`.

    The output tensor is read as :class:`posthoc.network.inputs.ModelCall` reads it (or by the user's
    ``output_fn``). An output that is already (B, C) (the model pools itself) is kept, with one UserWarning naming what
    laplace-torch would differentiate instead.

    Args:
        model: the network (only to read its raw output the way posthoc does).
        reduction: laplace-torch's feature_reduction value.
        output_fn: the user's ``output_fn``, applied first (None: a tensor, a tuple's first element, ``"logits"``).
    """

    def __init__(self, model: nn.Module, reduction: FeatureReduction,
                 output_fn: Callable[[Any], torch.Tensor] | None = None) -> None:
        self.reduction, self.read = reduction, ModelCall(model, output_fn=output_fn).output
        self.warned = False

    def __call__(self, raw: Any) -> torch.Tensor:
        """The reduced output (B, C) of the model's raw output."""
        outputs = self.read(raw)
        if outputs.ndim <= 2 and not self.warned:
            self.warned = True
            warnings.warn(
                f"feature_reduction={self.reduction.value!r}: the model already returns one output per example "
                f"{tuple(outputs.shape)}, pooling after its last layer; posthoc keeps the model's own pooling (the "
                f"Jacobian of the output the model gives), where laplace-torch would differentiate "
                f"{LAPLACE_TORCH_READS[self.reduction]}. The numbers agree only where the model pools that way; "
                "leave feature_reduction=None to silence this", UserWarning, stacklevel=2)
        return reduce_positions(outputs, self.reduction)


def reduced_output_fn(model: nn.Module, feature_reduction: Any,
                      output_fn: Callable[[Any], torch.Tensor] | None) -> Callable[[Any], torch.Tensor] | None:
    """The ``output_fn`` for laplace-torch's ``feature_reduction`` (None, a value, or its enum): ``output_fn`` if None.

    Raises:
        ValueError: a value other than "pick_first", "pick_last", "average" (or None).
    """
    value = getattr(feature_reduction, "value", feature_reduction)
    if value is None:
        return output_fn
    return ReducedOutput(model, check_choice(value, FeatureReduction, "feature_reduction"), output_fn)
