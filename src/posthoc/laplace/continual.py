"""Accumulating Laplace fits over data sets (continual learning, ``fit(..., override=False)``).

A second fit on new data B, after a fit on A, gives the curvature H_A + H_B (H_A at the weights of the first
fit, H_B at the weights now), N_A + N_B examples and log p(A) + log p(B) in the evidence; the posterior is
centred at the weights now. With unchanged weights this is exactly the fit on A and B together. Curvatures that
are sums over examples in closed form accumulate: "full" (the dense GGN) and "diag" (its diagonal).
"""

from __future__ import annotations

from posthoc.laplace.structures import CurvatureStructure
from posthoc.laplace.structures.diag import DiagCurvature
from posthoc.laplace.structures.full import FullCurvature

ACCUMULATING = ("full", "diag")


def check_accumulates(structure: CurvatureStructure) -> None:
    """Raise NotImplementedError, before any data pass, when ``structure``'s fits cannot be summed."""
    if not isinstance(structure, FullCurvature | DiagCurvature):
        raise NotImplementedError(
            f"fit(..., override=False) accumulates hessian_structure 'full' or 'diag' only, not "
            f"{type(structure).__name__}: kron/ekfac keep eigendecompositions of Kronecker factors (a sum of two "
            "Kronecker products is not one; laplace-torch's sum of the factors is an approximation posthoc does "
            "not make) and lowrank keeps top-k eigenpairs; refit on the union of the data instead, or use 'diag'")


def accumulated(previous: CurvatureStructure, new: CurvatureStructure) -> CurvatureStructure:
    """The structure whose curvature is the sum of two fits' curvatures (same subset, same structure).

    Args:
        previous: the structure of the earlier fit(s).
        new: the structure fitted on the new data, on the same covered parameters.

    Returns:
        full: H_prev + H_new (P, P); diag: h_prev + h_new (P,). Cost O(P^2) / O(P), no data pass.

    Raises:
        NotImplementedError: structures whose fitted form is not a sum over examples (kron/ekfac keep
            eigendecompositions of Kronecker factors, lowrank keeps top-k eigenpairs), naming the fix.
        ValueError: fits of different sizes (another last layer or subnetwork).
    """
    if previous.subset.n_params != new.subset.n_params:
        raise ValueError(f"the new fit covers {new.subset.n_params} parameters, the previous one "
                         f"{previous.subset.n_params}: accumulate fits of the same covered parameters")
    if isinstance(previous, FullCurvature) and isinstance(new, FullCurvature):
        return FullCurvature(new.subset, previous.hessian + new.hessian)
    if isinstance(previous, DiagCurvature) and isinstance(new, DiagCurvature):
        return DiagCurvature(new.subset, previous.diagonal + new.diagonal, new.chunk_bytes)
    check_accumulates(previous)
    raise NotImplementedError(f"cannot add a {type(new).__name__} fit to a {type(previous).__name__} fit")
