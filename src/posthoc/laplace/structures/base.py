"""The contract every Hessian structure implements, and the registry they plug into.

A structure stores the curvature H = sum_n J_n^T S_n S_n^T J_n (S_n from
:class:`posthoc.curvature.OutputFactors`, at sigma_noise = 1) in its own form.
The posterior precision is never stored: it is built on demand as

    Lambda(delta, s) = s * H + diag(delta)

from a prior tensor ``prior`` (1,), (n_blocks,) or (P,) (see
:mod:`posthoc.laplace.prior`) and a curvature scale ``scale`` (a 0-d tensor:
1 for classification, sigma^-2 or sigma^-4 for regression). So tuning delta or
sigma never refits, and every quantity below is differentiable in both.
Structures that add the prior in an eigenbasis (kron, ekfac) accept scalar or
per-layer priors only and raise ValueError for a per-parameter one.
"""

from __future__ import annotations

import abc
from enum import Enum
from typing import Any, Callable, ClassVar, Iterable

import torch

from posthoc.curvature.checks import check_curvature_finite  # noqa: F401  (the structures import it from here)
from posthoc.curvature.output_factors import OutputFactors
from posthoc.network.subset import ParameterSubset

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class HessianStructure(str, Enum):
    FULL = "full"
    DIAG = "diag"
    KRON = "kron"
    EKFAC = "ekfac"
    LOWRANK = "lowrank"


class CurvatureStructure(abc.ABC):
    """Curvature in one structure plus the posterior algebra of Lambda(delta, s)."""

    structure: ClassVar[HessianStructure]
    supports_subnetwork: ClassVar[bool] = True
    supports_parameter_prior: ClassVar[bool] = True

    def __init__(self, subset: ParameterSubset) -> None:
        self.subset = subset

    @classmethod
    @abc.abstractmethod
    def fit(cls, subset: ParameterSubset, batches: Batches, factors: OutputFactors, progress: bool = True,
            **options: Any) -> "CurvatureStructure":
        """Accumulate the curvature over the data.

        ``batches()`` returns a fresh iterator of (inputs, targets), where inputs
        are already the covered module's inputs (``subset.inputs(x)``); call it
        once per data pass. ``factors(outputs, targets)`` gives S (B, C, K).
        ``options`` are structure-specific (e.g. rank, subsample); unknown ones
        raise TypeError.
        """

    @abc.abstractmethod
    def logdet_precision(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """log det Lambda(delta, s), a 0-d tensor, differentiable in prior and scale."""

    @abc.abstractmethod
    def functional_covariance(self, inputs: torch.Tensor, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """J(x) Lambda^-1 J(x)^T for each input: (B, C, C), the glm predictive covariance.

        ``inputs`` are the covered module's inputs. Implementations avoid P x P
        matrices and per-example C x P Jacobians where the structure allows.
        """

    @abc.abstractmethod
    def sample(self, n_samples: int, prior: torch.Tensor, scale: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
        """Offsets theta - theta* ~ N(0, Lambda^-1): (n_samples, P)."""

    @abc.abstractmethod
    def dense_precision(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The dense (P, P) Lambda of this structure (tests and small nets only)."""

    def posterior_variance(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """diag(Lambda^-1), (P,). Default: from the dense precision; structures override it cheaply."""
        return torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(self.dense_precision(prior, scale))))

    def largest_eigenvalue(self) -> torch.Tensor | None:
        """lambda_max(H) (0-d), for structures whose posterior algebra loses variance to float32 round-off when
        s * lambda_max / min(delta) approaches 1 / eps; ``Laplace`` then warns. None (the default): the
        structure's algebra stays accurate in float32 (e.g. diag: 1 / (s h + delta) per entry)."""
        return None

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Tensors and settings that restore the fitted curvature exactly."""

    @classmethod
    @abc.abstractmethod
    def from_state_dict(cls, subset: ParameterSubset, state: dict[str, Any]) -> "CurvatureStructure":
        """Inverse of :meth:`state_dict`."""


STRUCTURES: dict[HessianStructure, type[CurvatureStructure]] = {}


def register_structure(cls: type[CurvatureStructure]) -> type[CurvatureStructure]:
    """Class decorator: make a structure available to ``Laplace(hessian_structure=...)``."""
    if cls.structure in STRUCTURES:
        raise ValueError(f"hessian_structure {cls.structure.value!r} is already registered")
    STRUCTURES[cls.structure] = cls
    return cls
