"""Classification metrics on predictive probabilities (see docs/metrics.md).

Every function takes ``probs`` of shape (N, C), the final predictive class
probabilities (not logits), and integer labels ``y`` of shape (N,). Inputs are
validated before any work: ``probs`` must be finite, lie in [0, 1] and have rows
that sum to 1 within ``1e-3``. Results are Python floats computed in float64.
All costs are O(N·C) time and memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posthoc.utils.checks import check_finite, check_labels, check_ndim, check_positive_int

__all__ = [
    "CalibrationBins",
    "accuracy",
    "brier",
    "calibration_bins",
    "ece",
    "mean_confidence",
    "nll",
]

_ROW_SUM_TOL = 1e-3
# Values produced by float arithmetic (e.g. renormalised Dirichlet means) can
# overshoot [0, 1] by an ulp or so; only larger excursions are rejected.
_RANGE_TOL = 1e-6


def _check_probs(probs: torch.Tensor, name: str = "probs") -> torch.Tensor:
    """Validate class probabilities of shape (N, C); returns ``probs`` unchanged."""
    check_ndim(probs, 2, name, "(N, C)")
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of probabilities, got {probs.dtype}")
    if probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(probs.shape)}")
    check_finite(probs, name)
    lo, hi = float(probs.min()), float(probs.max())
    row_sums = probs.sum(dim=1, dtype=torch.float64)
    worst = float((row_sums - 1.0).abs().max())
    if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL or worst > _ROW_SUM_TOL:
        raise ValueError(
            f"{name} must hold class probabilities (entries in [0, 1], rows summing to 1 "
            f"within {_ROW_SUM_TOL:g}); got entries in [{lo:.4g}, {hi:.4g}] and a row sum "
            f"off by {worst:.4g}. Pass probabilities, not logits: apply "
            "torch.softmax(logits, dim=-1) first"
        )
    return probs


def _check_probs_labels(probs: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_probs(probs)
    y = check_labels(y, probs.shape[1], "y")
    if y.shape[0] != probs.shape[0]:
        raise ValueError(
            f"probs has {probs.shape[0]} rows but y has {y.shape[0]} labels; they must match"
        )
    return probs, y.to(probs.device)


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of points whose argmax class equals the label.

    Args:
        probs: (N, C) class probabilities.
        y: (N,) integer labels in [0, C).

    Ties in ``probs`` go to the lowest class index (``torch.argmax``).
    Cost: O(N·C).
    """
    probs, y = _check_probs_labels(probs, y)
    return float((probs.argmax(dim=1) == y).double().mean())


def mean_confidence(probs: torch.Tensor) -> float:
    """Mean max-probability ``mean_n max_c p_nc``, the confidence the OOD tables report.

    Args:
        probs: (N, C) class probabilities (no labels needed: also for OOD inputs).

    Between 1/C and 1. Cost: O(N·C).
    """
    _check_probs(probs)
    return float(probs.max(dim=1).values.double().mean())


def nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Negative log-likelihood ``-mean_n log p_n[y_n]`` (natural log).

    Args:
        probs: (N, C) class probabilities.
        y: (N,) integer labels in [0, C).

    A probability of exactly 0 for the true class would give an infinite NLL;
    ``p`` is therefore clamped from below at ``torch.finfo(probs.dtype).tiny``
    (the smallest positive normal number of the dtype: 1.2e-38 for float32,
    2.2e-308 for float64), so one such point contributes at most about 87.3
    (float32) or 708.4 (float64) to the sum. Half-precision probabilities are
    clamped at float32's (float16's own, 6.1e-5, would cap a point at 9.7 and
    raise every smaller true-class probability to it). Computed in float64. Cost: O(N·C).
    """
    probs, y = _check_probs_labels(probs, y)
    p_true = probs.gather(1, y[:, None]).squeeze(1)
    floor_dtype = probs.dtype if probs.dtype in (torch.float32, torch.float64) else torch.float32
    p_true = p_true.double().clamp(min=torch.finfo(floor_dtype).tiny)
    return float(-p_true.log().mean())


def brier(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Multi-class Brier score ``mean_n Σ_c (p_nc − 1[y_n = c])²``.

    Args:
        probs: (N, C) class probabilities.
        y: (N,) integer labels in [0, C).

    Ranges over [0, 2]. For C = 2 it equals twice scikit-learn's binary
    ``brier_score_loss(y, p[:, 1])``, which scores only the positive class.
    Cost: O(N·C).
    """
    probs, y = _check_probs_labels(probs, y)
    p = probs.double()
    onehot = torch.nn.functional.one_hot(y, probs.shape[1]).double()
    return float(((p - onehot) ** 2).sum(dim=1).mean())


@dataclass(frozen=True)
class CalibrationBins:
    """Confidence histogram of a classifier, the input of ECE and reliability diagrams.

    Attributes (float64 tensors, ``counts`` int64):
        edges: (n_bins + 1,) equal-width bin edges from 0 to 1; bin b covers
            (edges[b], edges[b + 1]], and the first bin also holds confidence 0.
        confidence: (n_bins,) mean max-probability confidence of the points in
            each bin; NaN for empty bins.
        accuracy: (n_bins,) fraction of correct argmax predictions per bin; NaN
            for empty bins.
        counts: (n_bins,) number of points per bin.
    """

    edges: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor
    counts: torch.Tensor

    @property
    def n_bins(self) -> int:
        """Number of bins."""
        return int(self.counts.shape[0])

    @property
    def n(self) -> int:
        """Total number of points."""
        return int(self.counts.sum())

    @property
    def ece(self) -> float:
        """Expected calibration error ``Σ_b (n_b / N) |acc_b − conf_b|`` (empty bins add 0)."""
        nonempty = self.counts > 0
        if not bool(nonempty.any()):
            raise ValueError("calibration bins are empty; ECE is undefined")
        weights = self.counts[nonempty].double() / self.counts.sum()
        gaps = (self.accuracy[nonempty] - self.confidence[nonempty]).abs()
        return float((weights * gaps).sum())


def calibration_bins(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> CalibrationBins:
    """Bin points by confidence ``max_c p_nc`` into ``n_bins`` equal-width bins on (0, 1].

    Args:
        probs: (N, C) class probabilities.
        y: (N,) integer labels in [0, C).
        n_bins: number of bins (15 is the benchmark setting; see docs/metrics.md).

    The prediction is the argmax class (ties to the lowest index). Bin b holds
    confidences in (b/n_bins, (b+1)/n_bins]; a confidence of exactly 0 goes to
    the first bin. Returns a :class:`CalibrationBins`; empty bins have count 0
    and NaN means. Cost: O(N·C + n_bins).
    """
    check_positive_int(n_bins, "n_bins", "the number of confidence bins")
    probs, y = _check_probs_labels(probs, y)
    conf, pred = probs.max(dim=1)
    # Tolerated overshoot above 1 (see _RANGE_TOL) must still land in the last bin.
    conf = conf.double().clamp(0.0, 1.0).cpu()
    correct = (pred == y).double().cpu()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # bucketize(right=False) returns i with edges[i-1] < conf <= edges[i], i.e. the
    # right-closed bins; subtracting 1 gives the bin index, and conf == 0 gives -1.
    idx = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    counts = torch.bincount(idx, minlength=n_bins)
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    denom = counts.double()
    nan = torch.full_like(denom, float("nan"))
    empty = counts == 0
    confidence = torch.where(empty, nan, conf_sum / denom.clamp(min=1))
    acc = torch.where(empty, nan, acc_sum / denom.clamp(min=1))
    return CalibrationBins(edges=edges, confidence=confidence, accuracy=acc, counts=counts)


def ece(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error ``Σ_b (n_b / N) |acc_b − conf_b|``.

    Args:
        probs: (N, C) class probabilities.
        y: (N,) integer labels in [0, C).
        n_bins: number of equal-width confidence bins (see :func:`calibration_bins`).

    Cost: O(N·C + n_bins).
    """
    return calibration_bins(probs, y, n_bins).ece
