"""Evaluation metrics: accuracy, NLL, Brier, ECE, OOD scores and AUROC, regression NLL/RMSE, multi-label NLL/Brier/ECE."""

from posthoc.metrics.classification import (
    CalibrationBins,
    accuracy,
    brier,
    calibration_bins,
    ece,
    mean_confidence,
    nll,
)
from posthoc.metrics.multilabel import multilabel_brier, multilabel_ece, multilabel_nll
from posthoc.metrics.ood import auroc, entropy, half_logdet
from posthoc.metrics.regression import gaussian_nll, rmse

__all__ = [
    "CalibrationBins",
    "accuracy",
    "auroc",
    "brier",
    "calibration_bins",
    "ece",
    "entropy",
    "gaussian_nll",
    "half_logdet",
    "mean_confidence",
    "multilabel_brier",
    "multilabel_ece",
    "multilabel_nll",
    "nll",
    "rmse",
]
