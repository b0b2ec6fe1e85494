"""Eigendecompositions of Kronecker factors that survive rank-deficient low-precision factors.

KFAC's factors are often singular (dead ReLU channels, zero-padded patches, duplicated features, fewer examples
than input dimensions), and a float32 ``torch.linalg.eigh`` of such a matrix can fail to converge (LAPACK or
cuSOLVER raise ``torch.linalg.LinAlgError``) or return non-finite values. :func:`factor_eigh` then repeats the
decomposition in float64 on the same device and casts the result back, and says so once per call with a
RuntimeWarning naming the factors. Eigenvalues are clamped at 0 (round-off below zero in a PSD matrix).
"""

from __future__ import annotations

import warnings
from typing import Mapping

import torch


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``torch.linalg.eigh`` of ``matrix``, or None when it fails or returns non-finite values."""
    try:
        evals, evecs = torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        return None
    if not (bool(torch.isfinite(evals).all()) and bool(torch.isfinite(evecs).all())):
        return None
    return evals, evecs


def factor_eigh(factors: Mapping[str, torch.Tensor], what: str = "Kronecker factors"
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Eigenvalues (D,) clamped at 0 and eigenvectors (D, D) of each symmetric PSD factor, by name.

    A factor whose eigendecomposition fails in its own dtype is decomposed in float64 and cast back; if any
    was, one RuntimeWarning lists them (``what`` names the factors in it). Float64 factors that fail raise
    ``torch.linalg.LinAlgError``. Cost: one O(D³) eigh per factor, a second in float64 for a failed one.

    Args:
        factors: name -> symmetric PSD matrix (D, D), finite (check before: a NaN factor fails in any dtype).
        what: what the factors are, for the warning.

    Returns:
        name -> (eigenvalues (D,), eigenvectors (D, D)) in each factor's dtype and device.
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    redone: list[str] = []
    for name, matrix in factors.items():
        result = _eigh(matrix)
        if result is None:
            if matrix.dtype == torch.float64:
                raise torch.linalg.LinAlgError(f"torch.linalg.eigh failed on the float64 {what} {name!r}")
            redone.append(name)
            evals, evecs = torch.linalg.eigh(matrix.to(torch.float64))
            result = evals.to(matrix.dtype), evecs.to(matrix.dtype)
        out[name] = (result[0].clamp_min(0), result[1])
    if redone:
        warnings.warn(
            f"torch.linalg.eigh failed or returned non-finite values on {len(redone)} {what} in their own precision "
            f"(rank-deficient or ill-conditioned: {', '.join(repr(n) for n in redone[:5])}"
            f"{', ...' if len(redone) > 5 else ''}); they were decomposed in float64 and cast back",
            RuntimeWarning, stacklevel=2)
    return out
