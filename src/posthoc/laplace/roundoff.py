"""The warning when a model's floating-point precision cannot resolve a Laplace posterior.

Used by :class:`posthoc.laplace.Laplace` before every read of the posterior (evidence, prediction,
sampling, variances).
"""

from __future__ import annotations

import warnings

import torch

from posthoc.laplace.structures import CurvatureStructure

# Relative float32 round-off of the posterior algebra above which a warning names float64 as the fix:
# a structure's error grows like eps * s * lambda_max(H) / min(delta) (measured for full: 3% at 6e-2).
ROUNDOFF_WARN = 1e-2


def warn_roundoff(structure: CurvatureStructure, dtype: torch.dtype, prior: torch.Tensor, scale: torch.Tensor,
                  structure_name: str, stacklevel: int = 4) -> None:
    """Warn (RuntimeWarning) when ``dtype`` cannot resolve Lambda = s H + diag(delta) at this delta.

    The structures whose algebra loses variance to round-off report lambda_max(H)
    (:meth:`CurvatureStructure.largest_eigenvalue`); the relative error grows like
    eps * s * lambda_max / min(delta), and the warning is given above :data:`ROUNDOFF_WARN`. Silent in
    float64. Cost: a min over delta (prior (1,), (n_tensors,) or (P,)); ``scale`` is s, a scalar tensor.
    """
    eps = torch.finfo(dtype).eps
    if eps < 1e-10:
        return
    lam = structure.largest_eigenvalue()
    if lam is None:
        return
    s, smallest = float(scale.detach()), float(prior.detach().min())
    ratio = eps * s * float(lam) / smallest
    if ratio > ROUNDOFF_WARN:
        warnings.warn(
            f"{dtype} cannot resolve this posterior: the curvature's largest eigenvalue ({s * float(lam):.3g}) is "
            f"{ratio / eps:.2g} times the smallest prior precision ({smallest:.3g}), so variances may be off by up "
            f"to about {min(ratio, 1.0):.0%} (hessian_structure={structure_name!r}). Fit in float64 "
            "(model.double() and float64 inputs) or use a larger prior precision",
            RuntimeWarning, stacklevel=stacklevel,
        )
