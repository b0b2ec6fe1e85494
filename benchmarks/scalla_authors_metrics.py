"""The ScaLLA authors' classification metrics as their code computes them (BayesiPy's SoftmaxClassification).

Their tables (the ScaLLA paper's FMNIST rows: MAP, LLA-KFAC, ScaLLA, ScaLLA-biased) come from this metric. For a
Gaussian predictive N(f(x), Sigma(x)) it averages softmax over 2,048 logit samples per batch of 100 inputs, drawn as
f(x) + einsum("sna,nab->snb", z, L) = f(x) + z^T L with L the lower Cholesky factor of Sigma(x) (their
safe_cholesky, which adds jitter on failure) and z from one generator seeded 2147483647. The samples' covariance is
therefore L^T L, not Sigma = L L^T: same trace, other directions. :func:`authors_code_probs` reproduces it as
published, so that our posteriors can be scored both ways beside their figures; posthoc's own MC link samples Sigma.
Used by lla_kfac_reproduction.py and scalla_authors.py.
"""

from __future__ import annotations

from typing import Any

import torch

from posthoc import metrics
from posthoc.predictive import GaussianPredictive

SAMPLES = 2048
BATCH = 100  # their evaluation loaders' batch size: one Cholesky call and one draw of z per batch
GENERATOR_SEED = 2147483647  # their metric's generator, seeded once at reset


def authors_cholesky(cov: torch.Tensor) -> torch.Tensor:
    """Their safe_cholesky: the lower Cholesky factor of ``cov`` (b, C, C).

    On failure, jitter 1e-6 (float32; 1e-8 otherwise) x 10^i is added to every diagonal of the batch until it
    succeeds (at most ten tries), as their code does.
    """
    try:
        return torch.linalg.cholesky(cov)
    except RuntimeError:
        shifted, added = cov.clone(), 0.0
        for i in range(10):
            jitter = (1e-6 if cov.dtype == torch.float32 else 1e-8) * 10**i
            shifted.diagonal(dim1=-2, dim2=-1).add_(jitter - added)
            added = jitter
            try:
                return torch.linalg.cholesky(shifted)
            except RuntimeError:
                continue
        raise


def authors_code_probs(pred: GaussianPredictive) -> torch.Tensor:
    """Class probabilities (B, C), float64, as the authors' metric computes them from ``pred`` (in float32).

    Per batch of BATCH inputs in order: L = their safe_cholesky(Sigma), z ~ N(0, I) of shape (2048, b, C), samples
    mean + z^T L (covariance L^T L), probabilities the mean of the samples' softmax. Cost: O(B * 2048 * C^2).
    """
    generator = torch.Generator().manual_seed(GENERATOR_SEED)
    mean, cov = pred.mean.float(), pred.cov.float()
    chunks = []
    for start in range(0, len(mean), BATCH):
        m, factor = mean[start:start + BATCH], authors_cholesky(cov[start:start + BATCH])
        z = torch.randn(SAMPLES, *m.shape, generator=generator, dtype=m.dtype)
        chunks.append((m + torch.einsum("sna,nab->snb", z, factor)).softmax(-1).mean(0))
    return torch.cat(chunks).double()


def authors_code_metrics(pred: GaussianPredictive, labels: torch.Tensor) -> dict[str, Any]:
    """Accuracy, NLL, ECE (15 bins) and Brier of :func:`authors_code_probs` on ``labels`` (B,)."""
    probs = authors_code_probs(pred)
    return {"accuracy": metrics.accuracy(probs, labels), "nll": metrics.nll(probs, labels),
            "ece": metrics.calibration_bins(probs, labels).ece, "brier": metrics.brier(probs, labels)}
