"""Assembling a Laplace predictive from a fitted structure: the linearised (glm) and the sampled (nn) one.

Used by :meth:`posthoc.laplace.Laplace.predict`, which checks the inputs and the fit first.
"""

from __future__ import annotations

from enum import Enum

import torch

from posthoc.laplace.structures import CurvatureStructure
from posthoc.network.inputs import ModelInputs
from posthoc.network.subset import ParameterSubset
from posthoc.predictive import GaussianPredictive, SamplePredictive


class PredType(str, Enum):
    """The predictive of a Laplace posterior."""

    GLM = "glm"  # linearised: N(f(x; theta*), J Lambda^-1 J^T)
    NN = "nn"  # sampled weights, full forward passes


def glm_predictive(structure: CurvatureStructure, subset: ParameterSubset, inputs: ModelInputs,
                   prior: torch.Tensor, scale: torch.Tensor) -> GaussianPredictive:
    """N(f(x; theta*), J Lambda^-1 J^T): mean (B, C), covariance (B, C, C) symmetrised.

    ``inputs`` are the covered function's (``subset.inputs(x)``). Cost: one forward pass and the structure's
    functional covariance.
    """
    with torch.no_grad():
        mean = subset.forward(inputs)
    cov = structure.functional_covariance(inputs, prior, scale).detach()
    return GaussianPredictive(mean, cov=0.5 * (cov + cov.transpose(1, 2)))


def nn_predictive(subset: ParameterSubset, inputs: ModelInputs, thetas: torch.Tensor) -> SamplePredictive:
    """Outputs f(x; theta_s) (S, B, C) for weight samples ``thetas`` (S, P): S forward passes."""
    with torch.no_grad():
        return SamplePredictive(torch.stack([subset.forward(inputs, theta) for theta in thetas]))
