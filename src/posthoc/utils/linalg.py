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


def gram(x: torch.Tensor) -> torch.Tensor:
    """Σ over leading dims and positions of x xᵀ for x (..., D, L): (D, D).

    Batched products when D ≤ 4·L (no copy of x), else one GEMM on a (·, D) copy;
    extra memory at most 4 times the size of x.
    """
    d, n_pos = x.shape[-2:]
    if n_pos == 1:
        flat = x[..., 0].reshape(-1, d)
    elif d <= 4 * n_pos:
        return torch.matmul(x, x.mT).sum(tuple(range(x.ndim - 2)))
    else:
        flat = x.transpose(-1, -2).reshape(-1, d)
    return flat.T @ flat
