"""Metrics of independent Bernoulli outputs (binary and multi-label classifiers, ``likelihood="binary"``).

Every function takes ``probs`` (N, K), the predictive probability P(y_nk = 1) of each label (not logits; the
rows need not sum to 1), and targets ``y`` (N, K) in {0, 1} ((N,) for K = 1). Each of the N·K label decisions
counts as one binary prediction: they are scored as N·K two-class rows (1 - p, p) with label y by
:mod:`posthoc.metrics.classification`, so the values are averages over all labels of all examples. Results are
Python floats computed in float64. Cost O(N·K).
"""

from __future__ import annotations

import torch

from posthoc.metrics.classification import brier, ece, nll
from posthoc.utils.checks import check_finite

__all__ = ["multilabel_brier", "multilabel_ece", "multilabel_nll"]

_RANGE_TOL = 1e-6  # as for class probabilities: an ulp of overshoot is tolerated


def _binary_rows(probs: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The N·K label decisions as class-probability rows (N·K, 2) = (1 - p, p) and labels (N·K,)."""
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point() or probs.ndim not in (1, 2):
        raise TypeError("probs must be a floating-point tensor (N, K) of label probabilities P(y = 1)")
    if not isinstance(y, torch.Tensor):
        raise TypeError("y must be a tensor (N, K) of 0/1 targets")
    probs = probs.unsqueeze(-1) if probs.ndim == 1 else probs
    y = y.unsqueeze(-1) if y.ndim == 1 and probs.shape[1] == 1 else y
    if y.shape != probs.shape:
        raise ValueError(f"y must have the shape of probs {tuple(probs.shape)} (one 0/1 target per label), got "
                         f"{tuple(y.shape)}")
    check_finite(probs, "probs")
    if float(probs.min()) < -_RANGE_TOL or float(probs.max()) > 1 + _RANGE_TOL:
        raise ValueError(f"probs must be label probabilities in [0, 1], got entries in [{float(probs.min()):.4g}, "
                         f"{float(probs.max()):.4g}]; pass torch.sigmoid(logits), not logits")
    if bool(((y != 0) & (y != 1)).any()):
        raise ValueError("y must hold 0/1 targets (one Bernoulli outcome per label)")
    p = probs.reshape(-1).clamp(0.0, 1.0)
    return torch.stack([1 - p, p], dim=-1), y.reshape(-1).long().to(probs.device)


def multilabel_nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Per-label NLL: ``-mean_{n,k} [y log p + (1 - y) log(1 - p)]`` (BCE averaged over all N·K labels).

    Args:
        probs: (N, K) label probabilities P(y_nk = 1).
        y: (N, K) targets in {0, 1} ((N,) for K = 1).

    Probabilities are clamped at the dtype's smallest normal number, as in :func:`posthoc.metrics.nll`.

    Raises:
        ValueError: shapes that differ, probabilities outside [0, 1], targets other than 0 and 1.
    """
    return nll(*_binary_rows(probs, y))


def multilabel_brier(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Brier score ``mean_{n,k} (p_nk - y_nk)^2`` in [0, 1] (scikit-learn's binary one, averaged over labels).

    Args:
        probs: (N, K) label probabilities P(y_nk = 1).
        y: (N, K) targets in {0, 1} ((N,) for K = 1).

    Raises:
        ValueError: as :func:`multilabel_nll`.
    """
    return 0.5 * brier(*_binary_rows(probs, y))  # the two-class Brier counts each label's error twice


def multilabel_ece(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> float:
    """ECE over all N·K label probabilities, each a binary prediction with confidence max(p, 1 - p).

    The N·K decisions (predict 1 where p > 1/2) are pooled into ``n_bins`` equal-width confidence bins
    (:func:`posthoc.metrics.calibration_bins`): ``sum_b (n_b / (N K)) |acc_b - conf_b|``. Labels are not
    weighted by frequency, so rare labels count as often as they occur.

    Args:
        probs: (N, K) label probabilities P(y_nk = 1).
        y: (N, K) targets in {0, 1} ((N,) for K = 1).
        n_bins: the number of bins.

    Raises:
        ValueError: as :func:`multilabel_nll`, or n_bins < 1.
    """
    return ece(*_binary_rows(probs, y), n_bins=n_bins)
