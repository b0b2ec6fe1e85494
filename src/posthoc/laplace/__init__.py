"""Laplace approximations: full, diag, KFAC, EKFAC and low-rank posteriors with glm and sampled predictives.

Over all weights, the last layer or a subnetwork, of any model (:mod:`posthoc.network`).
"""

from posthoc.laplace.function_space import exact_lla
from posthoc.laplace.functional import FunctionalLaplace
from posthoc.laplace.laplace import Laplace, PredType, PriorOptimization
from posthoc.laplace.layer_covariance import LayerCovariance, layer_covariances
from posthoc.laplace.structures import STRUCTURES, HessianStructure, get_structure, register_structure
from posthoc.network.subset import ParameterSubset, SubsetOfWeights

__all__ = [
    "Laplace",
    "FunctionalLaplace",
    "PredType",
    "PriorOptimization",
    "HessianStructure",
    "SubsetOfWeights",
    "ParameterSubset",
    "STRUCTURES",
    "register_structure",
    "get_structure",
    "exact_lla",
    "layer_covariances",
    "LayerCovariance",
]
