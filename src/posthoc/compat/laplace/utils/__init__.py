"""``laplace.utils``: laplace-torch's option enums and subnetwork masks.

The enums hold laplace-torch's values (str enums, so posthoc accepts them wherever it takes the strings); the
masks are :mod:`posthoc.laplace.subnetwork`'s; ``KronDecomposed`` (also as ``utils.matrix.KronDecomposed``) is
the type of a Kronecker-factored ``posterior_precision`` (:mod:`posthoc.laplace.kron_decomposed`).
laplace-torch's other helpers (``Kron``, the feature extractor, metrics) are not provided.
"""

from __future__ import annotations

from enum import Enum

from posthoc.laplace.kron_decomposed import KronDecomposed
from posthoc.laplace.subnetwork import (
    LargestMagnitudeSubnetMask,
    LargestVarianceDiagLaplaceSubnetMask,
    LargestVarianceSWAGSubnetMask,
    LastLayerSubnetMask,
    ModuleNameSubnetMask,
    ParamNameSubnetMask,
    RandomSubnetMask,
    ScoreBasedSubnetMask,
    SubnetMask,
)

__all__ = [
    "SubsetOfWeights", "HessianStructure", "Likelihood", "PredType", "LinkApprox", "TuningMethod", "PriorStructure",
    "SubnetMask", "ScoreBasedSubnetMask", "RandomSubnetMask", "LargestMagnitudeSubnetMask",
    "LargestVarianceDiagLaplaceSubnetMask", "LargestVarianceSWAGSubnetMask", "ParamNameSubnetMask",
    "ModuleNameSubnetMask", "LastLayerSubnetMask", "KronDecomposed",
]


class SubsetOfWeights(str, Enum):
    """``subset_of_weights`` values."""

    ALL = "all"
    LAST_LAYER = "last_layer"
    SUBNETWORK = "subnetwork"


class HessianStructure(str, Enum):
    """``hessian_structure`` values ("gp": the function-space :class:`posthoc.compat.laplace.FunctionalLaplace`)."""

    FULL = "full"
    KRON = "kron"
    DIAG = "diag"
    LOWRANK = "lowrank"
    GP = "gp"


class Likelihood(str, Enum):
    """``likelihood`` values ("reward_modeling": fitted as pairwise classification, predicted as regression)."""

    REGRESSION = "regression"
    CLASSIFICATION = "classification"
    REWARD_MODELING = "reward_modeling"


class PredType(str, Enum):
    """``pred_type`` values ("gp": the function-space Laplace's predictive)."""

    GLM = "glm"
    NN = "nn"
    GP = "gp"


class LinkApprox(str, Enum):
    """``link_approx`` values for classification."""

    MC = "mc"
    PROBIT = "probit"
    BRIDGE = "bridge"
    BRIDGE_NORM = "bridge_norm"


class TuningMethod(str, Enum):
    """``method`` values of ``optimize_prior_precision``."""

    MARGLIK = "marglik"
    GRIDSEARCH = "gridsearch"


class PriorStructure(str, Enum):
    """``prior_structure`` values of ``optimize_prior_precision``."""

    SCALAR = "scalar"
    DIAG = "diag"
    LAYERWISE = "layerwise"
