"""FiberSampler on the conformance family (a short walk, a briefly trained anchored map).

Checks, with the NLL computed here from the eval-mode network at the weights of fit: the MAP's training NLL the
sampler reports is that network's (and, for regression, the estimated noise is its residual RMS); the stage-2
samples cover the right parameters, move away from theta*, and keep the mean training NLL within the loss
tolerance of the MAP's; the sampled predictive is the eval-mode network at those samples, finite with a PSD
covariance.
"""

from __future__ import annotations

import math

import pytest
import torch
from conformance.models import MODELS, Case, model_params
from conformance.references import Covered, Expected, assert_finite_psd, covered, outcome

from posthoc.fiber import FiberSampler

SUBSETS = ["all", "last_layer"]
TOLERANCE = 0.05
SETTINGS = dict(n_particles=3, steps=20, burn_in=8, thin=3, step_size=3e-3, batch_size=32, subsample_size=96,
                cg_steps=3, loss_tolerance=TOLERANCE, latent_dim=3, deform="anchored", flow_steps=10,
                flow_loss_samples=4, n_check=4, progress=False)

EXPECTED_ERRORS = [
    Expected("tied_embedding", "last_layer", ValueError, "tied weights",
             "the output layer's weight is also the embedding's, so a last-layer posterior over it is refused (as "
             "in Laplace) and the error names subset_of_weights='all'"),
    Expected("tied_head_first", "last_layer", ValueError, "tied weights", "as tied_embedding"),
]


def _mean_nll(case: Case, cov: Covered, theta: torch.Tensor, sigma: float) -> float:
    """Mean per-example training NLL of the eval-mode network at theta (regression: Gaussian, summed over outputs)."""
    with torch.no_grad():
        out = cov.forward(case.x, theta)
    if case.likelihood == "classification":
        return float(torch.nn.functional.cross_entropy(out, case.y))
    return float((0.5 * (case.y - out).square() / sigma**2 + 0.5 * math.log(2 * math.pi * sigma**2)).sum(-1).mean())


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("model_name", model_params())
def test_fiber(model_name: str, subset: str) -> None:
    case = MODELS[model_name]()
    with outcome(EXPECTED_ERRORS, model_name, subset):
        fs = FiberSampler(case.model, case.likelihood, subset_of_weights=subset, **SETTINGS)
        case.after_build(case.model)
        fs.fit(case.loader())
        cov = covered(case, subset)
        theta = cov.theta()
        sigma = 1.0
        if case.likelihood == "regression":
            with torch.no_grad():
                rms = float((case.y - case.reference(case.x)).square().mean().sqrt())
            assert abs(float(fs.sigma_noise) / rms - 1) < 1e-9, \
                f"estimated noise {float(fs.sigma_noise):.6g} is not the MAP residual RMS {rms:.6g}"
            sigma = rms
        map_nll = _mean_nll(case, cov, theta, sigma)
        reported = fs.bench_info()["map_train_nll"]
        assert abs(reported - map_nll) <= 1e-9 * max(1.0, abs(map_nll)), \
            f"the sampler's MAP training NLL {reported:.6g} is not the eval-mode model's {map_nll:.6g}"
        samples = fs.sample(16, seed=5)
        assert samples.shape == (16, theta.numel()), f"samples {tuple(samples.shape)}, expected (16, {theta.numel()})"
        assert bool(torch.isfinite(samples).all())
        assert float((samples - theta).abs().max()) > 0, "stage-2 samples do not move from theta*"
        excess = torch.tensor([_mean_nll(case, cov, th, sigma) - map_nll for th in samples])
        assert float(excess.max()) <= TOLERANCE, (f"{int((excess > TOLERANCE).sum())}/16 samples exceed the loss "
                                                  f"tolerance (max excess {float(excess.max()):.3g})")
        case.before_predict(case.model)
        pred = fs.predict(case.x_test, n_samples=8, seed=5)
        with torch.no_grad():
            expected = torch.stack([cov.forward(case.x_test, th) for th in fs.sample(8, seed=5)])
        err = float((pred.samples - expected).abs().max())
        assert err <= 1e-6, f"sampled predictive differs from the eval-mode network at the samples by {err:.3g}"
        assert_finite_psd(pred.cov, "fiber predictive covariance")
