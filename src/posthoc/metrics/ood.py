"""Uncertainty scores and the OOD detection AUROC (see docs/metrics.md).

Two scores are used to tell out-of-distribution inputs from in-distribution
ones: the predictive entropy of the class probabilities, and the logit variance
score ½ log det Σ(x) of a Gaussian predictive. Higher means "more uncertain".
"""

from __future__ import annotations

import math

import torch

from posthoc.metrics.classification import _check_probs
from posthoc.utils.checks import check_finite, check_ndim

__all__ = ["auroc", "entropy", "half_logdet"]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy ``−Σ_c p_c log p_c`` per point (natural log, 0·log 0 = 0).

    Args:
        probs: (N, C) class probabilities (validated as in the classification metrics).

    Returns:
        (N,) tensor in the dtype of ``probs``, between 0 and log C. Cost: O(N·C).
    """
    _check_probs(probs)
    probs = probs.clamp(min=0)  # the check tolerates round-off down to -1e-6, where p log p is NaN
    return -torch.special.xlogy(probs, probs).sum(dim=1)


def half_logdet(cov: torch.Tensor, jitter: float = 0.0) -> torch.Tensor:
    """Logit variance score ``½ log det Σ`` per point.

    Args:
        cov: either (N, C, C) covariance matrices, or (N, C) variances (the
            diagonal of Σ), for which the score is ``½ Σ_c log var_c``.
        jitter: non-negative value added to the diagonal (or to the variances)
            before the factorisation, for covariances that are only positive
            semi-definite in floating point.

    Returns:
        (N,) tensor in the dtype of ``cov``.

    Full matrices are symmetrised as (Σ + Σᵀ)/2 and factorised by Cholesky,
    ``½ log det Σ = Σ_i log L_ii``; cost O(N·C³). Raises ``ValueError`` naming
    the first offending point when a matrix is not positive definite (or a
    variance not positive). Variances cost O(N·C).
    """
    check_ndim(cov, (2, 3), "cov", "(N, C, C) covariances or (N, C) variances")
    if not cov.is_floating_point():
        raise TypeError(f"cov must be a floating-point tensor, got {cov.dtype}")
    check_finite(cov, "cov")
    jitter = float(jitter)
    if not math.isfinite(jitter) or jitter < 0:
        raise ValueError(f"jitter must be finite and >= 0, got {jitter!r}")
    hint = "pass jitter=... (e.g. 1e-6 times the typical variance) to add it to the diagonal"

    if cov.ndim == 2:
        var = cov + jitter
        bad = var <= 0
        if bool(bad.any()):
            first = int(bad.any(dim=1).nonzero()[0])
            raise ValueError(
                f"cov holds variances that are not positive ({int(bad.sum())} entries, first "
                f"at point {first}); {hint}"
            )
        return 0.5 * var.log().sum(dim=1)

    if cov.shape[1] != cov.shape[2]:
        raise ValueError(f"cov must have shape (N, C, C) with square matrices, got {tuple(cov.shape)}")
    sym = 0.5 * (cov + cov.transpose(1, 2))
    if jitter:
        sym = sym + jitter * torch.eye(cov.shape[1], dtype=cov.dtype, device=cov.device)
    chol, info = torch.linalg.cholesky_ex(sym)
    failed = info != 0
    if bool(failed.any()):
        first = int(failed.nonzero()[0])
        raise ValueError(
            f"cov is not positive definite for {int(failed.sum())} of {cov.shape[0]} points "
            f"(first at point {first}), so log det is undefined; {hint}"
        )
    return torch.diagonal(chol, dim1=1, dim2=2).log().sum(dim=1)


def _check_scores(s: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N,), got {type(s).__name__}")
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    check_ndim(s, 1, name, "(N,)")
    if s.numel() == 0:
        raise ValueError(f"{name} is empty; AUROC needs at least one score in each group")
    if s.is_complex():
        raise TypeError(f"{name} must hold real scores, got {s.dtype}")
    s = s.detach().double().cpu()
    if bool(torch.isnan(s).any()):
        raise ValueError(f"{name} contains {int(torch.isnan(s).sum())} NaN score(s); AUROC is undefined")
    return s


def auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """Area under the ROC curve for detecting OOD inputs by a score.

    Args:
        score_in: (N_in,) scores of in-distribution inputs (negative class).
        score_out: (N_out,) scores of OOD inputs (positive class). A higher
            score means "more likely OOD". (N, 1) columns are accepted too.

    Returns:
        P(score_out > score_in) + ½ P(score_out = score_in), computed exactly
        from average ranks (the Mann–Whitney U statistic), so ties count one
        half: 1 for perfect separation, 0 for reversed, 0.5 when all scores are
        equal. ±Inf scores are ranked normally; NaN raises. Cost: O(N log N)
        with N = N_in + N_out.
    """
    s_in = _check_scores(score_in, "score_in")
    s_out = _check_scores(score_out, "score_out")
    n_in, n_out = s_in.numel(), s_out.numel()
    _, inverse, counts = torch.unique(torch.cat([s_in, s_out]), return_inverse=True, return_counts=True)
    # Group g of tied values occupies ranks start+1 .. start+count; its average rank
    # is start + (count + 1) / 2, with start the number of strictly smaller values.
    counts = counts.double()
    start = torch.cumsum(counts, 0) - counts
    avg_rank = start + (counts + 1) / 2
    rank_sum_out = float(avg_rank[inverse[n_in:]].sum())
    u_out = rank_sum_out - n_out * (n_out + 1) / 2
    return u_out / (n_in * n_out)
