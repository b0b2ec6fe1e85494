"""Bench rows for ScaLLA (see docs/scalla.md): unbiased and biased, context = the suite's context set.

``scalla`` / ``scalla_biased``: the paper's probe objective with the reference per-step settings (5 train + 5
context points, one Rademacher probe, Adam 5e-5 constant) for BENCH_STEPS = 20,000 steps = 2e5 JVP evaluations,
1/50 of the reference recipe's 1e7. ``scalla_defaults`` / ``scalla_biased_defaults``: the library's default
training (the "directions" objective, see posthoc.scalla.ScaLLA), 2.8e5 / 2.0e5 evaluations. How the two
compare on the full FMNIST suite: docs/measurements/core.md and benchmarks/results/scalla_efficiency.md. All rows: m = 100, default surrogate (trunk from the MAP
network), the m x m posterior on the full training set, scalar prior precision by validation NLL over
GRIDSEARCH_PRIORS (probit link, as every Gaussian row). Surrogate checkpoints are not kept by the bench.
"""

from __future__ import annotations

from typing import Callable

import torch

from posthoc.bench.methods import BenchContext, register_method
from posthoc.scalla import ScaLLA
from posthoc.scalla.training import TrainSettings

GRIDSEARCH_PRIORS = tuple(float(v) for v in torch.logspace(-3, 4, 29))
BENCH_STEPS = 20_000
BENCH_OPTIONS = dict(objective="probes", batch_size=5, n_probes=1, lr=5e-5, lr_schedule="constant",
                     steps=BENCH_STEPS, checkpoint_every=1000)


def scalla_builder(biased: bool, **options) -> Callable[[BenchContext], ScaLLA]:
    """A bench builder: train the surrogate on train + context, fit the posterior, gridsearch delta on val NLL."""

    def build(ctx: BenchContext) -> ScaLLA:
        s = ScaLLA(ctx.model, "classification", biased=biased, seed=ctx.seed, progress=ctx.progress,
                   **{**BENCH_OPTIONS, **options})
        s.fit(ctx.train_loader, context_loader=ctx.context_loader)
        s.optimize_prior_precision(method="gridsearch", val_loader=ctx.val_loader,
                                   grid=torch.tensor(GRIDSEARCH_PRIORS))
        return s

    return build


# The library's defaults (the deterministic "directions" objective: JVPs of 2,000 train + context points along the
# top-100 GGN eigenvectors, 3,000 Adam steps of 64) for comparison with the probe-objective rows above.
DEFAULTS = {name: getattr(TrainSettings(), name) for name in BENCH_OPTIONS}
register_method("scalla_defaults", scalla_builder(biased=False, **DEFAULTS),
                "ScaLLA m=100 with the library's default training (directions objective), prior by validation NLL")
register_method("scalla_biased_defaults", scalla_builder(biased=True, **DEFAULTS),
                "ScaLLA-biased m=100 with the library's default training (directions objective), prior by validation "
                "NLL")
register_method("scalla", scalla_builder(biased=False),
                "ScaLLA m=100, surrogate kernel from JVPs (probe objective, 2e5 JVPs), prior by validation NLL")
register_method("scalla_biased", scalla_builder(biased=True),
                "ScaLLA-biased m=100 (train x context kernel zeroed, 2e5 JVPs), prior by validation NLL")
