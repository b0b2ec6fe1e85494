"""Dense linear algebra helpers shared by the posterior structures."""

from __future__ import annotations

import warnings

import torch

_warned: set[str] = set()


def cholesky_with_jitter(matrix: torch.Tensor, what: str, max_tries: int = 6) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric positive definite (..., n, n) matrix.

    On failure, retries with jitter * mean(diag) added to the diagonal, jitter
    from 1e-10 up by factors of 100 (float32: from 1e-7), and warns once per
    ``what``. Raises ``torch.linalg.LinAlgError`` if even the largest jitter fails.
    """
    chol, info = torch.linalg.cholesky_ex(matrix)
    if not bool((info != 0).any()):
        return chol
    diag_mean = torch.diagonal(matrix, dim1=-2, dim2=-1).mean(-1, keepdim=True).abs().clamp_min(1e-30)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    jitter = 1e-10 if matrix.dtype == torch.float64 else 1e-7
    for _ in range(max_tries):
        chol, info = torch.linalg.cholesky_ex(matrix + (jitter * diag_mean).unsqueeze(-1) * eye)
        if not bool((info != 0).any()):
            if what not in _warned:
                _warned.add(what)
                warnings.warn(
                    f"Cholesky of the {what} failed; succeeded after adding {jitter:.0e} x mean(diag) jitter",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return chol
        jitter *= 100
    raise torch.linalg.LinAlgError(f"Cholesky of the {what} failed even with jitter; the matrix is not positive definite")


def psd_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric PSD matrix with eigenvalues clamped at 0 (round-off)."""
    evals, evecs = torch.linalg.eigh(matrix)
    return evals.clamp_min(0), evecs
