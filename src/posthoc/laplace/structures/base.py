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
from typing import Any, Callable, ClassVar, Iterable, cast

import torch

from posthoc.curvature.checks import check_curvature_finite  # noqa: F401  (the structures import it from here)
from posthoc.curvature.output_factors import OutputFactors
from posthoc.network.inputs import ModelInputs
from posthoc.network.subset import ParameterSubset
from posthoc.utils.registry import add_to_registry

Batches = Callable[[], Iterable[tuple[ModelInputs, torch.Tensor]]]


class HessianStructure(str, Enum):
    """The built-in posterior structures (others are registered by name)."""

    FULL = "full"
    DIAG = "diag"
    KRON = "kron"
    EKFAC = "ekfac"
    LOWRANK = "lowrank"


class CurvatureStructure(abc.ABC):
    """Curvature in one structure plus the posterior algebra of Lambda(delta, s)."""

    structure: ClassVar[HessianStructure | str]  # the name the decorator form of register_structure uses
    supports_subnetwork: ClassVar[bool] = True
    supports_parameter_prior: ClassVar[bool] = True
    supports_low_precision: ClassVar[bool] = False  # float16/bfloat16 models (needs no eigen/Cholesky kernels)

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
        """Log det Lambda(delta, s), a 0-d tensor, differentiable in prior and scale."""

    @abc.abstractmethod
    def functional_covariance(self, inputs: ModelInputs, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
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

    def solve(self, rhs: torch.Tensor, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Lambda^-1 rhs for rhs (P, K).

        Default: a Cholesky factorisation of the dense Lambda, O(P^3) time and O(P^2) memory; structures with a
        cheap inverse override it.
        """
        return torch.cholesky_solve(rhs, torch.linalg.cholesky(self.dense_precision(prior, scale)))

    def posterior_variance(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """diag(Lambda^-1), (P,). Default: from the dense precision; structures override it cheaply."""
        return torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(self.dense_precision(prior, scale))))

    def largest_eigenvalue(self) -> torch.Tensor | None:
        """lambda_max(H) (0-d), for structures whose posterior algebra loses variance to float32 round-off.

        That happens when s * lambda_max / min(delta) approaches 1 / eps; ``Laplace`` then warns. None (the
        default): the structure's algebra stays accurate in float32 (e.g. diag: 1 / (s h + delta) per entry).
        """
        return None

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Tensors and settings that restore the fitted curvature exactly."""

    @classmethod
    @abc.abstractmethod
    def from_state_dict(cls, subset: ParameterSubset, state: dict[str, Any]) -> "CurvatureStructure":
        """Inverse of :meth:`state_dict`."""


STRUCTURES: dict[str, type[CurvatureStructure]] = {}  # keyed by name (a HessianStructure member's value)


def register_structure(name: str | type[CurvatureStructure], cls: type[CurvatureStructure] | None = None,
                       replace: bool = False) -> type[CurvatureStructure]:
    """Make a structure available to ``Laplace(hessian_structure=name)``.

    ``register_structure("mine", MyCurvature)`` registers a plug-in under a name of its choosing;
    ``@register_structure`` on a class (the built-ins) registers it under ``cls.structure``.
    Returns the class, so both forms work as a decorator's result.

    Raises:
        ValueError: the name is empty or already registered (pass ``replace=True`` to replace it).
        TypeError: ``cls`` is not a CurvatureStructure subclass.
    """
    if cls is None:  # the decorator form: the class names itself
        if not isinstance(name, type):
            raise TypeError(f"register_structure(name, cls): cls is missing for name {name!r}")
        cls, name = name, getattr(name, "structure", "")
    if not (isinstance(cls, type) and issubclass(cls, CurvatureStructure)):
        raise TypeError(f"register a CurvatureStructure subclass, got {cls!r}")
    return add_to_registry(STRUCTURES, structure_name(cast("HessianStructure | str", name)), cls, "hessian_structure", replace)


def structure_name(structure: HessianStructure | str) -> str:
    """The registry key of a structure: a HessianStructure member's value, or the string itself."""
    return structure.value if isinstance(structure, HessianStructure) else structure


def get_structure(structure: HessianStructure | str) -> tuple[str, type[CurvatureStructure]]:
    """(name, class) of a registered structure.

    Raises:
        ValueError: no structure is registered under that name (the message lists the registered ones).
    """
    name = structure_name(structure)
    if not isinstance(name, str) or name not in STRUCTURES:
        built_in = [m.value for m in HessianStructure if m.value in STRUCTURES]
        names = built_in + [n for n in STRUCTURES if n not in built_in]  # the built-ins in the enum's order
        raise ValueError(f"unknown hessian_structure {structure!r}; choose one of "
                         f"{', '.join(map(repr, names))} (or register one with "
                         "posthoc.laplace.register_structure)")
    return name, STRUCTURES[name]
