"""Assembling a Laplace predictive from a fitted structure: the linearised (glm) and the sampled (nn) one.

Used by :meth:`posthoc.laplace.Laplace.predict`, which checks the inputs and the fit first.
"""

from __future__ import annotations

from enum import Enum

import torch

from posthoc.laplace.structures import CurvatureStructure
from posthoc.likelihood import Likelihood
from posthoc.network.inputs import ModelInputs
from posthoc.network.positions import position_blocks, unflattened_shape
from posthoc.network.subset import ParameterSubset
from posthoc.predictive import GaussianPredictive, Predictive, SamplePredictive
from posthoc.predictive.bernoulli import BernoulliPredictive
from posthoc.predictive.links import LinkApprox


class PredType(str, Enum):
    """The predictive of a Laplace posterior."""

    GLM = "glm"  # linearised: N(f(x; theta*), J Lambda^-1 J^T)
    NN = "nn"  # sampled weights, full forward passes


def glm_predictive(structure: CurvatureStructure, subset: ParameterSubset, inputs: ModelInputs,
                   prior: torch.Tensor, scale: torch.Tensor, link_approx: LinkApprox | str) -> Predictive:
    """N(f(x; theta*), J Lambda^-1 J^T): mean (B, C), covariance (B, C, C) symmetrised.

    ``link_approx``: the predictive's default link, that of ``probs()`` (``Laplace.predict`` passes
    ``la.default_link_approx``, so ``la.predict(x).probs()`` equals ``la(x)``).

    ``inputs`` are the covered function's (``subset.inputs(x)``). Cost: one forward pass and the structure's
    functional covariance. Outputs with positions (``subset.flatten_positions``): a :class:`PositionPredictive`,
    mean (B, ..., C) and the per-position covariances (B, ..., C, C) (the diagonal blocks of the joint one).
    """
    with torch.no_grad():
        mean = subset.forward(inputs)
    cov = structure.functional_covariance(inputs, prior, scale).detach()
    cov = 0.5 * (cov + cov.transpose(1, 2))
    if not subset.flatten_positions:
        return GaussianPredictive(mean, cov=cov, link_approx=link_approx)
    shape = unflattened_shape(subset, inputs)
    blocks = position_blocks(cov, shape[-1]).reshape(-1, shape[-1], shape[-1])  # (B·L, C, C)
    rows = GaussianPredictive(mean.reshape(-1, shape[-1]), cov=blocks, link_approx=link_approx)
    return PositionPredictive(rows, shape)


def for_likelihood(pred: Predictive, likelihood: Likelihood) -> Predictive:
    """``pred`` as the likelihood reads it: a :class:`BernoulliPredictive` (sigmoid links) for "binary", else as is."""
    return BernoulliPredictive(pred) if likelihood is Likelihood.BINARY else pred


def likelihood_link(likelihood: Likelihood, default: str) -> str:
    """The default link of la(x) for a likelihood: "probit" (MacKay's sigmoid link) for "binary", else ``default``.

    The softmax links ("probit_centred", "bridge") do not apply to independent Bernoulli outputs.
    """
    return "probit" if likelihood is Likelihood.BINARY else default


def nn_predictive(subset: ParameterSubset, inputs: ModelInputs, thetas: torch.Tensor) -> Predictive:
    """Outputs f(x; theta_s) (S, B, C) for weight samples ``thetas`` (S, P): S forward passes.

    Outputs with positions: a :class:`PositionPredictive` of the samples (S, B, ..., C).
    """
    with torch.no_grad():
        samples = torch.stack([subset.forward(inputs, theta) for theta in thetas])
    if not subset.flatten_positions:
        return SamplePredictive(samples)
    shape = unflattened_shape(subset, inputs)
    return PositionPredictive(SamplePredictive(samples.reshape(len(thetas), -1, shape[-1])), shape)


class PositionPredictive(Predictive):
    """A predictive of outputs with positions (B, ..., C): a (B·L, C) predictive of the positions, reshaped.

    Every result has the positions back: mean, var and probs (B, ..., C), cov (B, ..., C, C) (each position's;
    positions are not joint), samples (S, B, ..., C), log_prob (B, ...) per position. ``rows`` holds the
    B·L positions in row-major order. Cost: that of ``rows``; reshapes are views.
    """

    def __init__(self, rows: Predictive, shape: tuple[int, ...]) -> None:
        self.rows, self.shape = rows, tuple(shape)

    @property
    def mean(self) -> torch.Tensor:
        """Predictive mean (B, ..., C)."""
        return self.rows.mean.reshape(self.shape)

    @property
    def var(self) -> torch.Tensor:
        """Marginal variances (B, ..., C)."""
        return self.rows.var.reshape(self.shape)

    @property
    def cov(self) -> torch.Tensor:
        """Per-position covariances (B, ..., C, C)."""
        return self.rows.cov.reshape(*self.shape, self.shape[-1])

    def probs(self, link_approx: LinkApprox | str | None = None, n_samples: int = 1000,
              seed: int = 0) -> torch.Tensor:
        """Class probabilities (B, ..., C) per position (``link_approx`` None: the default link of ``rows``)."""
        kwargs = {} if link_approx is None else {"link_approx": link_approx}
        return self.rows.probs(n_samples=n_samples, seed=seed, **kwargs).reshape(self.shape)

    def with_noise(self, sigma_noise: float | torch.Tensor) -> "PositionPredictive":
        """The predictive of y = f + eps per position (regression)."""
        return PositionPredictive(self.rows.with_noise(sigma_noise), self.shape)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Log density (B, ...) of targets y (B, ..., C) at every position (regression)."""
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != self.shape:
            raise ValueError(f"targets must have the predictive's shape {self.shape}, got "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
        return self.rows.log_prob(y.reshape(-1, self.shape[-1])).reshape(self.shape[:-1])

    def sample(self, n_samples: int, seed: int = 0) -> torch.Tensor:
        """Output samples (S, B, ..., C)."""
        return self.rows.sample(n_samples, seed=seed).reshape(n_samples, *self.shape)

    def __len__(self) -> int:
        """The batch size B."""
        return self.shape[0]
