"""laplace-torch 0.3's ``laplace`` package on posthoc.

Change ``from laplace import ...`` to ``from posthoc.compat.laplace import ...`` (and ``laplace.utils`` /
``laplace.curvature`` likewise).

Provided: ``Laplace`` and the class names (``FullLaplace``, ``KronLLLaplace``, ``DiagSubnetLaplace``, ...),
``marglik_training``, the enums, the subnetwork masks (``posthoc.compat.laplace.utils``), the backend names
(``posthoc.compat.laplace.curvature``), ``FunctionalLaplace`` / ``hessian_structure="gp"``,
``likelihood="reward_modeling"``, ``fit(override=False)`` ("full", "diag", "kron") and ``enable_backprop`` (also
with the last layer and with FunctionalLaplace). ``posterior_precision`` of "kron" is a ``KronDecomposed``
(``posthoc.compat.laplace.utils.matrix``). Not yet (NotImplementedError naming posthoc issue 18): reward
modelling with the last layer; accumulating "ekfac"/"lowrank" fits raises NotImplementedError; KronLaplace's
``damping=True`` raises NotImplementedError.
Out of scope: ELLA, VaLLA, the "nystrom" and "variational" approximations.
"""

from posthoc.compat.laplace.baselaplace import (
    BaseLaplace,
    DiagLaplace,
    DiagLLLaplace,
    DiagSubnetLaplace,
    FullLaplace,
    FullLLLaplace,
    FullSubnetLaplace,
    FunctionalLaplace,
    KronLaplace,
    KronLLLaplace,
    Laplace,
    LowRankLaplace,
    ParametricLaplace,
)
from posthoc.compat.laplace.marglik_training import marglik_training
from posthoc.compat.laplace.utils import (
    HessianStructure,
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    SubsetOfWeights,
    TuningMethod,
)

__all__ = [
    "Laplace", "BaseLaplace", "ParametricLaplace", "FullLaplace", "KronLaplace", "DiagLaplace", "LowRankLaplace",
    "FunctionalLaplace", "FullLLLaplace", "KronLLLaplace", "DiagLLLaplace", "FullSubnetLaplace", "DiagSubnetLaplace",
    "marglik_training", "SubsetOfWeights", "HessianStructure", "Likelihood", "PredType", "LinkApprox",
    "TuningMethod", "PriorStructure",
]
