"""Bench methods for fiber sampling: ``fiber_lastlayer`` and ``fiber_all``.

Both use the prior N(0, delta^-1 I) with delta = 0.1 P / ||theta*||^2 (a prior standard deviation sqrt(10) times
the root-mean-square MAP weight of the covered parameters; no tuning on validation data; the same rule as the toy
and UCI benchmarks, see benchmarks/fiber_toy.py for why 0.1), the loss tolerance 0.05 nats per example, the
coupling flow with its loss-aware term, and predict by MC over stage-2 samples (the ``mc`` link). The row's
``info`` holds :meth:`FiberSampler.bench_info` (within-tolerance fractions of stage 1 and stage 2, final step
size, the mixing figure eta * delta * kept steps, timings).

Sizes: the last layer's features are computed once, so its steps are cheap (timings in
docs/measurements/core.md). All weights: every product is a pass through the CNN, so the walk is short (4 particles x 30 steps, step 2e-5) and does NOT reach the walk's
stationary distribution (eta delta x kept steps << 1): it samples the fiber near theta*. Its cost per walk step
does not depend on N; on the full 55k-image suite only the all-data checks (12 walked + 8 stage-2 samples, one
forward pass over the data each, plus a correction round) grow, by roughly 14x.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from posthoc.bench.methods import BenchContext, register_method
from posthoc.fiber import FiberSampler
from posthoc.network.subset import ParameterSubset
from posthoc.predictive import LinkApprox, SamplePredictive

PRIOR_SCALE = 0.1  # delta = PRIOR_SCALE * P / ||theta*||^2
FIBER_SETTINGS: dict[str, dict[str, Any]] = {
    # last layer (2,010 parameters on the FMNIST CNN): features are computed once, so steps are cheap; the step
    # size is set from delta in fiber_builder (eta = 0.03 / delta: eta delta x 150 kept steps = 4.5)
    "last_layer": dict(deform="flow", n_particles=16, steps=300, burn_in=150, thin=10, batch_size=16,
                       subsample_size=512, cg_steps=8, pullback_steps=5, latent_dim=16, flow_steps=200,
                       flow_loss_batch=256, flow_loss_samples=16, n_check=64),
    # all weights (140,594 parameters): every product is a pass through the CNN; bounded, not mixed
    # step 2e-5: larger steps left the loss tolerance outside the check subsample (docs/measurements/core.md)
    "all": dict(deform="flow", n_particles=4, steps=30, burn_in=15, thin=5, step_size=2e-5, batch_size=16, subsample_size=64,
                cg_steps=3, pullback_steps=2, final_rounds=1, latent_dim=8, flow_steps=100, flow_loss_batch=64,
                flow_loss_samples=4, n_check=8),
}
ETA_DELTA = {"last_layer": 0.03}
PREDICT_SAMPLES = {"last_layer": 100, "all": 30}


def map_scaled_prior(theta: torch.Tensor, scale: float = PRIOR_SCALE) -> float:
    """Delta = scale * P / ||theta*||^2 for the P covered MAP weights theta* (the fiber benchmarks' prior rule)."""
    return scale * theta.numel() / float(theta.pow(2).sum())


def fiber_settings(model: torch.nn.Module, subset: str) -> dict[str, Any]:
    """The bench's FiberSampler keyword arguments for ``subset`` ("last_layer" or "all"), prior included."""
    prior = map_scaled_prior(ParameterSubset(model, subset).theta_map)
    settings = dict(FIBER_SETTINGS[subset], prior_precision=prior, loss_tolerance=0.05)
    if subset in ETA_DELTA:
        settings["step_size"] = ETA_DELTA[subset] / prior
    return settings


class BenchFiber:
    """A fitted FiberSampler that predicts with a fixed number of stage-2 samples (same samples every batch)."""

    def __init__(self, sampler: FiberSampler, n_samples: int) -> None:
        self.sampler, self.n_samples = sampler, n_samples
        self.prior_precision = float(sampler.prior_precision.mean())

    def predict(self, x: torch.Tensor) -> SamplePredictive:
        """``n_samples`` stage-2 samples of the outputs for inputs ``x`` (B, ...): (S, B, C); S forward passes."""
        predictive = self.sampler.predict(x, n_samples=self.n_samples)
        assert isinstance(predictive, SamplePredictive)  # the bench's models have (B, C) outputs
        return predictive

    def bench_info(self) -> dict[str, float]:
        """:meth:`FiberSampler.bench_info`, for the results' info column."""
        return self.sampler.bench_info()


def fiber_builder(subset: str, **options: Any) -> Callable[[BenchContext], BenchFiber]:
    """Builder of a fiber row over ``subset`` ("last_layer" or "all"): :data:`FIBER_SETTINGS` updated by ``options``.

    The builder fits a :class:`FiberSampler` on the training loader (the walk and the flow: the row's cost).
    """
    def build(ctx: BenchContext) -> BenchFiber:
        fs = FiberSampler(ctx.model, "classification", subset_of_weights=subset, seed=ctx.seed, progress=ctx.progress,
                          **{**fiber_settings(ctx.model, subset), **options})
        fs.fit(ctx.train_loader)
        return BenchFiber(fs, PREDICT_SAMPLES[subset])

    return build


register_method("fiber_lastlayer", fiber_builder("last_layer"),
                "fiber sampling, last layer: 16 particles x 300 steps, coupling flow, 100 MC samples",
                link_approx=LinkApprox.MC)
register_method("fiber_all", fiber_builder("all"),
                "fiber sampling, all weights: 4 particles x 30 steps (not mixed), coupling flow, 30 MC samples",
                link_approx=LinkApprox.MC)
# stage 2 as the variational map of the toy benchmarks (latent 32, 800 steps of 16 draws on minibatches of 128)
register_method("fiber_lastlayer_variational",
                fiber_builder("last_layer", deform="variational", latent_dim=32, flow_steps=800, flow_lr=5e-3,
                              flow_loss_batch=128, flow_loss_samples=16),
                "fiber sampling, last layer, the walk of fiber_lastlayer, variational stage 2, 100 MC samples",
                link_approx=LinkApprox.MC)
# stage 2 as the anchored mixture of the toy benchmarks (walked samples within the tolerance plus a learned jitter)
register_method("fiber_lastlayer_anchored",
                fiber_builder("last_layer", deform="anchored", latent_dim=32, flow_steps=800, flow_lr=5e-3,
                              flow_loss_batch=128, flow_loss_samples=16),
                "fiber sampling, last layer, the walk of fiber_lastlayer, anchored stage 2, 100 MC samples",
                link_approx=LinkApprox.MC)
