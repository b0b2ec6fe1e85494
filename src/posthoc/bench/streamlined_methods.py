"""Bench rows for streamlined prediction next to the same Laplace posterior's glm and nn predictives.

Registered: ``la_diag_nn`` / ``la_kron_nn`` (the ``la_diag`` / ``la_kron`` Laplace, i.e. all
weights and a marglik-tuned scalar prior, predicted by 100 weight samples and full forward
passes, MC link), ``streamlined_diag`` / ``streamlined_kron`` (the same posteriors pushed
through the network in the diagonal activation mode, the output-variance scale fitted on the
validation split) and ``*_noscale`` (the same without that scale, to show its effect), and
``la_diag_scaled`` / ``la_kron_scaled`` (the glm predictive with the same kind of validation-fitted
variance scale, so that the scaled streamlined rows have a like-for-like glm row).
The rows share the la_diag / la_kron rows' fit (laplace_builder keeps the last fits of a run).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from posthoc.bench.methods import BenchContext, Predictor, laplace_builder, register_method
from posthoc.laplace import Laplace
from posthoc.predictive import GaussianPredictive, Predictive, predict_loader
from posthoc.predictive.scale import fit_variance_scale, scale_predictive
from posthoc.streamlined import Streamlined

NN_SAMPLES = 100


def cached_laplace(ctx: BenchContext, structure: str) -> Laplace:
    """The la_<structure> row's Laplace (all weights, marglik prior): fitted once per run.

    Raises:
        TypeError: If the la_<structure> builder returns something other than a :class:`Laplace`.
    """
    la = laplace_builder(structure, "all")(ctx)
    if not isinstance(la, Laplace):
        raise TypeError(f"the la_{structure} builder returned a {type(la).__name__}, not a Laplace")
    return la


def glm_predictive(la: Laplace, x: torch.Tensor) -> GaussianPredictive:
    """The glm predictive of ``la`` for inputs ``x`` (B, ...): N(f(x), J Σ Jᵀ) over the outputs (B, C).

    Raises:
        TypeError: If the Laplace returns another kind of predictive.
    """
    pred = la.predict(x, pred_type="glm")
    if not isinstance(pred, GaussianPredictive):
        raise TypeError(f"a glm predictive must be Gaussian, got a {type(pred).__name__}")
    return pred


class SampledLaplace:
    """A Laplace predicted with ``pred_type="nn"`` (seeded weight samples, full forward passes)."""

    def __init__(self, la: Laplace, n_samples: int, seed: int) -> None:
        self.la, self.n_samples, self.seed = la, n_samples, seed
        self.prior_precision = la.prior_precision

    def predict(self, x: torch.Tensor) -> Predictive:
        """Outputs of ``n_samples`` seeded weight samples for inputs ``x`` (B, ...): (S, B, C) samples.

        Cost: ``n_samples`` forward passes.
        """
        return self.la.predict(x, pred_type="nn", n_samples=self.n_samples, seed=self.seed)


class ScaledGLM:
    """A Laplace's glm predictive with its covariance multiplied by κ fitted on validation data."""

    def __init__(self, la: Laplace, val_loader) -> None:
        self.la, self.prior_precision = la, la.prior_precision
        pred, targets = predict_loader(lambda x: glm_predictive(la, x), val_loader)
        assert isinstance(pred, GaussianPredictive)  # joined glm predictives are Gaussian
        self.variance_scale = fit_variance_scale(pred, targets, "classification")

    def predict(self, x: torch.Tensor) -> GaussianPredictive:
        """The glm predictive (B, C) with its covariance multiplied by the fitted κ."""
        return scale_predictive(glm_predictive(self.la, x), self.variance_scale)

    def bench_info(self) -> dict[str, float]:
        """The fitted κ, for the results' info column."""
        return {"variance_scale": self.variance_scale}


class StreamlinedRow:
    """A :class:`Streamlined` predictor that records its Laplace posterior's prior precision for the results."""

    def __init__(self, streamlined: Streamlined, prior_precision: torch.Tensor) -> None:
        self.streamlined, self.prior_precision = streamlined, prior_precision

    def predict(self, x: torch.Tensor) -> GaussianPredictive:
        """The streamlined predictive (B, C) for inputs ``x`` (B, ...); one moment-propagating pass."""
        return self.streamlined.predict(x)

    def bench_info(self) -> dict[str, Any]:
        """:meth:`Streamlined.bench_info`, for the results' info column."""
        return self.streamlined.bench_info()


def nn_builder(structure: str) -> Callable[[BenchContext], Predictor]:
    """Builder of a ``la_<structure>_nn`` row: the cached Laplace predicted by ``NN_SAMPLES`` weight samples."""
    return lambda ctx: SampledLaplace(cached_laplace(ctx, structure), NN_SAMPLES, ctx.seed)


def streamlined_builder(structure: str, scale: bool, mode: str = "diagonal") -> Callable[[BenchContext], Predictor]:
    """Builder of a streamlined row: the cached la_<structure> posterior pushed through the network.

    ``mode``: the activation covariance; ``scale``: fit the output-variance scale on the validation split
    (one pass over it).
    """
    def build(ctx: BenchContext) -> StreamlinedRow:
        la = cached_laplace(ctx, structure)
        sp = Streamlined(ctx.model, posterior=la, activation_covariance=mode)
        if scale:
            sp.fit_variance_scale(ctx.val_loader)
        return StreamlinedRow(sp, la.prior_precision)
    return build


register_method("la_diag_nn", nn_builder("diag"),
                "LA, all weights, diagonal, marglik prior; nn predictive (100 weight samples)", link_approx="mc")
register_method("la_kron_nn", nn_builder("kron"),
                "LA, all weights, KFAC, marglik prior; nn predictive (100 weight samples)", link_approx="mc")
register_method("la_diag_scaled", lambda ctx: ScaledGLM(cached_laplace(ctx, "diag"), ctx.val_loader),
                "LA, all weights, diagonal, marglik prior; glm with an output-variance scale fitted on the validation "
                "split")
register_method("la_kron_scaled", lambda ctx: ScaledGLM(cached_laplace(ctx, "kron"), ctx.val_loader),
                "LA, all weights, KFAC, marglik prior; glm with an output-variance scale fitted on the validation split")
register_method("streamlined_diag", streamlined_builder("diag", scale=True),
                "the la_diag posterior by streamlined moment propagation (diagonal activations), "
                "output-variance scale fitted on the validation split")
register_method("streamlined_kron", streamlined_builder("kron", scale=True),
                "the la_kron posterior by streamlined moment propagation (diagonal activations), "
                "output-variance scale fitted on the validation split")
register_method("streamlined_diag_noscale", streamlined_builder("diag", scale=False),
                "the la_diag posterior by streamlined moment propagation (diagonal activations), no variance scale")
register_method("streamlined_kron_noscale", streamlined_builder("kron", scale=False),
                "the la_kron posterior by streamlined moment propagation (diagonal activations), no variance scale")
