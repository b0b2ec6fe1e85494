"""Accumulating Laplace fits over data sets (continual learning, ``fit(..., override=False)``).

A second fit on new data B, after a fit on A, gives the curvature of A (at the weights of the first fit) plus that
of B (at the weights now), N_A + N_B examples and log p(A) + log p(B) in the evidence; the posterior is centred at
the weights now. "full" and "diag" add their curvatures: with unchanged weights exactly the fit on A and B
together. "kron" combines the Kronecker factors as laplace-torch does: the input factors A (data means) are
averaged with weights N_A / N and N_B / N, the output factors G (data sums) and the exact diagonal of the
fallback blocks are added, and the result is decomposed again. That is the KFAC of A and B together (exact at
unchanged weights), not the sum of the two fits' Kronecker products (which is no Kronecker product).
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import TYPE_CHECKING, Any, Iterator, cast

import torch

from posthoc.curvature.kfac import KFACApproximation, KFACFactors, kfac_factors
from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.structures import CurvatureStructure
from posthoc.laplace.structures.base import Batches
from posthoc.laplace.structures.diag import DiagCurvature
from posthoc.laplace.structures.full import FullCurvature
from posthoc.laplace.structures.kron import KronCurvature, check_kron_subset
from posthoc.network.subset import ParameterSubset

if TYPE_CHECKING:  # only for annotations: laplace.py imports this module
    from posthoc.laplace.laplace import Laplace

# the raw KFAC factors of each fitted "kron" structure (its eigendecompositions alone do not give them back)
_KRON_FACTORS: weakref.WeakKeyDictionary[CurvatureStructure, KFACFactors] = weakref.WeakKeyDictionary()


def fit_structure(structure_cls: type[CurvatureStructure], subset: ParameterSubset, batches: Batches,
                  factors: OutputFactors, progress: bool, **options: Any) -> CurvatureStructure:
    """``structure_cls.fit(...)``; for "kron" the same fit, keeping its raw Kronecker factors for accumulation.

    Args:
        structure_cls: the registered structure class.
        subset: the covered parameters.
        batches: a callable giving the (inputs, targets) batches (one data pass each call).
        factors: the output factors S with S S^T = Lambda.
        progress: show a progress bar.
        **options: the structure's fit options.

    Returns:
        The fitted structure (cost: the structure's fit).
    """
    if structure_cls is not KronCurvature:
        return structure_cls.fit(subset, batches, factors, progress=progress, **options)
    approximation = KronCurvature._parse_options(options)
    check_kron_subset(subset, "kron")
    result = kfac_factors(subset, batches(), factors, approximation, progress, desc="Laplace fit (kron)",
                          item_rows=KronCurvature.item_rows(options))
    return kron_structure(subset, result, approximation)


def kron_structure(subset: ParameterSubset, result: KFACFactors, approximation: KFACApproximation) -> KronCurvature:
    """The kron structure of KFAC factors (their eigendecompositions), keeping the factors for accumulation."""
    structure = KronCurvature._from_factors(subset, result, approximation)
    _KRON_FACTORS[structure] = result
    return structure


@contextlib.contextmanager
def accumulating(la: "Laplace", override: bool) -> Iterator[None]:
    """Around a refit of ``la``: with ``override=False``, add the previous fit to the new one when it ends.

    The previous structure, N and log-likelihood statistic are taken before the refit (after checking, before
    any data pass, that the structure accumulates) and added to the new fit's afterwards (:func:`accumulated`).
    Nothing is added when the refit raises. With ``override=True`` or no previous fit it does nothing.

    Raises:
        NotImplementedError: a previous fit whose structure does not accumulate (:func:`check_accumulates`).
    """
    previous = None if override or la.structure is None else (la.structure, la.n_data, la._loglik_stat)
    if previous is not None:
        check_accumulates(previous[0])
    yield
    if previous is not None:
        structure, n_data, stat = previous
        la.structure = accumulated(structure, la._require_fit())
        la.n_data += n_data
        la._loglik_stat = cast(torch.Tensor, la._loglik_stat) + cast(torch.Tensor, stat)


def check_accumulates(structure: CurvatureStructure) -> None:
    """Raise NotImplementedError, before any data pass, when ``structure``'s fits cannot be summed."""
    if type(structure) is KronCurvature and structure not in _KRON_FACTORS:
        raise NotImplementedError("fit(..., override=False) with 'kron' needs the previous fit's Kronecker factors, "
                                  "which a structure restored by load_state_dict does not keep; refit on all the data")
    if not isinstance(structure, FullCurvature | DiagCurvature) and type(structure) is not KronCurvature:
        raise NotImplementedError(
            f"fit(..., override=False) accumulates hessian_structure 'full', 'diag' or 'kron' only, not "
            f"{type(structure).__name__}: ekfac's corrected eigenvalues and lowrank's top-k eigenpairs are not "
            "sums over examples; refit on the union of the data instead")


def accumulated(previous: CurvatureStructure, new: CurvatureStructure) -> CurvatureStructure:
    """The structure whose curvature is the sum of two fits' curvatures (same subset, same structure).

    Args:
        previous: the structure of the earlier fit(s).
        new: the structure fitted on the new data, on the same covered parameters.

    Returns:
        full: H_prev + H_new (P, P); diag: h_prev + h_new (P,); kron: the combined factors decomposed again
        (module docstring). Cost O(P^2) / O(P) / the eigendecompositions of the factors; no data pass.

    Raises:
        NotImplementedError: ekfac and lowrank (not sums over examples), a kron fit restored from a state dict.
        ValueError: fits of different sizes (another last layer or subnetwork).
    """
    if previous.subset.n_params != new.subset.n_params:
        raise ValueError(f"the new fit covers {new.subset.n_params} parameters, the previous one "
                         f"{previous.subset.n_params}: accumulate fits of the same covered parameters")
    if isinstance(previous, FullCurvature) and isinstance(new, FullCurvature):
        return FullCurvature(new.subset, previous.hessian + new.hessian)
    if isinstance(previous, DiagCurvature) and isinstance(new, DiagCurvature):
        return DiagCurvature(new.subset, previous.diagonal + new.diagonal, new.chunk_bytes)
    if type(previous) is KronCurvature and type(new) is KronCurvature:
        check_accumulates(previous)
        return _accumulated_kron(previous, new)
    check_accumulates(previous)
    raise NotImplementedError(f"cannot add a {type(new).__name__} fit to a {type(previous).__name__} fit")


def _accumulated_kron(previous: KronCurvature, new: KronCurvature) -> KronCurvature:
    """The kron structure of the combined factors: A weighted by the fits' N, G and the fallback diagonal summed."""
    return kron_structure(new.subset, combined_factors(_KRON_FACTORS[previous], _KRON_FACTORS[new]),
                          new.approximation)


def combined_factors(old: KFACFactors, fresh: KFACFactors) -> KFACFactors:
    """The KFAC factors of two data sets together: A weighted by their N, G and the fallback diagonal summed.

    Exact (to round-off) when both were computed at the same weights. Cost O(sum of the factors' sizes).

    Raises:
        ValueError: factors of different layers or fallback blocks.
    """
    if list(old.input_factors) != list(fresh.input_factors) or list(old.output_factors) != list(fresh.output_factors) \
            or old.fallback != fresh.fallback:
        raise ValueError("the two kron fits cover different layers; accumulate fits of the same covered parameters")
    n_total = old.n_data + fresh.n_data
    return dataclasses.replace(
        fresh,
        input_factors={name: (old.n_data * old.input_factors[name] + fresh.n_data * a) / n_total
                       for name, a in fresh.input_factors.items()},
        output_factors={name: old.output_factors[name] + g for name, g in fresh.output_factors.items()},
        fallback_diag=old.fallback_diag + fresh.fallback_diag,
        n_data=n_total,
    )
