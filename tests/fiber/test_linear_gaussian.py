"""The linear-Gaussian model f(x; theta) = x^T theta with P > N: the fiber is known exactly.

Ridge MAP theta* = (X^T X / s^2 + delta I)^-1 X^T y / s^2 lies in the row space of X, so the fiber
{theta : X theta = X theta*} is theta* + null(X) and theta* is its minimum-norm point. The prior
N(0, delta^-1 I) restricted to it is N(theta*, delta^-1 Pi) with Pi the projector onto null(X).
With full batches and exact CG the walk is, in null-space coordinates u = theta - theta*,

    u <- (1 - eta delta / 2) u + sqrt(eta) Pi xi,

an AR(1) chain with stationary covariance Pi / (delta (1 - eta delta / 4)): eta delta = 0.04 gives a
1 % discretisation bias, below one standard error of the Monte-Carlo estimate (checked in the test).
"""

from __future__ import annotations

import math

import torch
from references import linear_gaussian_fiber
from torch.utils.data import DataLoader, TensorDataset

from posthoc.fiber import FiberSampler

DTYPE = torch.float64


def test_walk_stays_on_fiber_and_matches_prior_projection():
    torch.set_num_threads(1)
    delta, sigma, eta = 2.0, 0.3, 0.02  # eta * delta = 0.04
    model, x, y, theta_star, null = linear_gaussian_fiber(delta=delta, sigma=sigma)
    n, p = x.shape
    # autocorrelation time of u^2 is about 1 / (eta delta) = 25 steps: burn-in 150 leaves a variance
    # deficit of (1 - eta delta / 2)^300 < 0.3 %; 256 chains run in one vmapped walk
    burn_in, kept, thin, particles = 150, 300, 10, 256
    fs = FiberSampler(model, "regression", n_particles=particles, steps=burn_in + kept, burn_in=burn_in, thin=thin,
                      step_size=eta, prior_precision=delta, sigma_noise=sigma, batch_size=n, subsample_size=n,
                      cg_steps=n + 2, damping=0.0, loss_tolerance=1e-3, latent_dim=p - n, deform="gaussian",
                      n_check=0, progress=False)
    samples = fs.walk(DataLoader(TensorDataset(x, y), batch_size=n))
    # the step never shrank (every pull-back succeeded), so the mixing figure is eta * delta * kept steps
    assert fs.info["step_size_final"] == eta
    assert abs(fs.info["eta_delta_kept_steps"] - eta * delta * kept) < 1e-9
    per_particle = kept // thin
    assert samples.shape == (particles * per_particle, p)
    # on the fiber: the training outputs are those of theta* to rounding error
    assert float((samples @ x.T - x @ theta_star).abs().max()) < 1e-10
    offsets = samples - theta_star
    assert float((offsets - offsets @ null).abs().max()) < 1e-10  # no movement in the row space
    # covariance along the fiber. Samples are appended one kept step at a time (K rows per step),
    # so regroup them per particle: the chains are independent, so the spread of the per-particle
    # covariance estimates gives an honest standard error that includes the autocorrelation within chains.
    by_particle = offsets.reshape(per_particle, particles, p).transpose(0, 1)  # (K, S, P)
    cov_k = torch.einsum("ksi,ksj->kij", by_particle, by_particle) / per_particle
    estimate = cov_k.mean(0)
    stderr = cov_k.std(0) / math.sqrt(particles)
    target = null / delta
    # trace: the total spread along the (P - N)-dimensional fiber
    tr_k = cov_k.diagonal(dim1=1, dim2=2).sum(-1)
    tr_err = float(tr_k.std() / math.sqrt(particles))
    assert abs(float(estimate.trace()) - (p - n) / delta) < 4 * tr_err, (float(estimate.trace()), tr_err)
    assert tr_err < 0.05 * (p - n) / delta  # the bound is tight enough to catch a wrong spread
    assert (p - n) / delta * eta * delta / 4 < tr_err  # the known discretisation bias is below one stderr
    # every entry within 5 standard errors (55 distinct entries; the errors are estimated from 256 chains)
    z = (estimate - target).abs() / stderr.clamp_min(1e-12)
    assert float(z.max()) < 5.0, float(z.max())


def test_walk_without_full_batch_is_pulled_back_to_low_loss():
    """With minibatches of 2 of the 4 examples the projection alone leaves the fiber; the pull-back keeps the
    training NLL on the subsample (here: all data) within the tolerance."""
    torch.set_num_threads(1)
    model, x, y, _, _ = linear_gaussian_fiber()
    fs = FiberSampler(model, "regression", n_particles=8, steps=60, burn_in=20, thin=5, step_size=0.01,
                      prior_precision=2.0, sigma_noise=0.3, batch_size=2, subsample_size=4, cg_steps=4,
                      damping=0.0, loss_tolerance=0.01, pullback_steps=3, latent_dim=4, deform="gaussian",
                      n_check=0, progress=False)
    fs.walk(DataLoader(TensorDataset(x, y), batch_size=4))
    assert fs.info["stage1_within_tol"] == 1.0
    assert fs.info["pullback_steps_per_step"] > 0  # the pull-back was needed and used
    assert bool((fs.particle_nll <= fs.map_nll + 0.01 + 1e-12).all())


def test_moves_that_leave_the_low_loss_set_are_rejected():
    """A step far too large for the fiber and no pull-back steps: every move that raises the subsample NLL above
    the tolerance is rejected, so all kept samples stay within it (the subsample is all the data here)."""
    torch.set_num_threads(1)
    model, x, y, _, _ = linear_gaussian_fiber()
    fs = FiberSampler(model, "regression", n_particles=4, steps=20, burn_in=10, thin=2, step_size=1.0,
                      prior_precision=2.0, sigma_noise=0.3, batch_size=2, subsample_size=4, cg_steps=2,
                      damping=0.0, loss_tolerance=0.01, pullback_steps=0, latent_dim=2, deform="gaussian",
                      n_check=0, final_rounds=0, progress=False)
    fs.walk(DataLoader(TensorDataset(x, y), batch_size=4))
    assert fs.info["failed_pullbacks"] > 0  # some moves were rejected
    assert bool((fs.particle_nll <= fs.map_nll + 0.01 + 1e-12).all())
