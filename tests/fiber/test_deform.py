"""Stage 2's variational flow: exact log densities of its samples, and the reverse-KL fit of known targets."""

from __future__ import annotations

import math

import torch
from fiber.common import LINEAR_DELTA, LINEAR_N, LINEAR_P, fit_on_linear_fiber

from posthoc.fiber import CouplingFlow
from posthoc.fiber.deform import variational_training_step

DTYPE = torch.float64


def _perturbed_flow(dim: int, seed: int) -> CouplingFlow:
    """A flow away from the identity (random weights everywhere), so every layer's log-determinant counts."""
    torch.manual_seed(seed)
    flow = CouplingFlow(dim, n_layers=4, hidden=8, seed=seed).to(DTYPE)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def test_sample_log_prob_matches_inverse_log_prob():
    torch.set_num_threads(1)
    flow = _perturbed_flow(5, seed=0)
    z = torch.randn(50, 5, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    with torch.no_grad():
        x, log_q = flow.sample_with_log_prob(z)
        torch.testing.assert_close(x, flow(z), rtol=0, atol=0)
        # forward (sampling) and inverse (density) paths are independent code: they agree to float64 rounding
        torch.testing.assert_close(flow.log_prob(x), log_q, rtol=0, atol=1e-9)
    assert float(log_q.std()) > 0.1  # a non-trivial density: the check above is not between constants


def test_variational_step_fits_a_gaussian_target_and_keeps_its_spread():
    """Reverse KL to N(mu, diag(sd^2)) (energy known up to a constant) has that Gaussian as its optimum. Without
    the entropy term the flow would collapse onto mu (std -> 0): the std check catches that."""
    torch.set_num_threads(1)  # a tiny flow: extra threads only add synchronisation cost on a busy machine
    torch.manual_seed(0)
    mu, sd = torch.tensor([1.0, -2.0], dtype=DTYPE), torch.tensor([0.5, 2.0], dtype=DTYPE)
    flow = CouplingFlow(2, n_layers=2, hidden=8).to(DTYPE)
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.03)
    generator = torch.Generator().manual_seed(2)
    for _ in range(400):
        z = torch.randn(64, 2, generator=generator, dtype=DTYPE)
        variational_training_step(flow, optimizer, z, lambda c: 0.5 * (((c - mu) / sd) ** 2).sum(-1))
    with torch.no_grad():
        x = flow(torch.randn(4000, 2, generator=generator, dtype=DTYPE))
    # Monte-Carlo error of 4,000 draws: 1.6 % of sd for the mean, 1.1 % for the std; Adam's stationary noise at
    # lr 0.03 adds a few percent: 10 % bounds are well above both and far below a collapse (std -> 0)
    assert float(((x.mean(0) - mu) / sd).abs().max()) < 0.1
    assert float((x.std(0) / sd - 1).abs().max()) < 0.1


def test_variational_sampler_recovers_the_prior_on_a_linear_fiber():
    """f(x) = x^T theta with P = 10 > N = 4: the fiber is theta* + null(X), theta* is orthogonal to null(X), and the
    prior N(0, delta^-1 I) restricted to it is N(theta*, delta^-1 Pi). The walked samples span null(X) (latent
    6 = P - N), so the variational map's optimum is exactly that Gaussian; the barrier never acts (outputs do not
    change)."""
    fs, x, theta, null = fit_on_linear_fiber("variational", n_particles=8, steps=40, burn_in=20, thin=4,
                                             step_size=0.05, flow_layers=2, flow_hidden=8, flow_steps=250,
                                             flow_lr=0.03, flow_loss_samples=32)
    n, p, delta = LINEAR_N, LINEAR_P, LINEAR_DELTA
    assert fs.info["stage2_within_tol"] == 1.0
    samples = fs.sample(4000, seed=3)
    assert float((samples @ x.T - x @ theta).abs().max()) < 1e-9  # on the fiber: decoded in null(X)
    offsets = samples - theta
    cov = offsets.T @ offsets / offsets.shape[0]
    # target trace (P - N) / delta = 3; Monte-Carlo error of 4,000 draws on the trace ~ 1 %, entries ~ 0.01;
    # tolerances 10 % / 0.05 leave room for Adam's noise; starting at 0.1 x the walked scales, an untrained or
    # collapsed flow is far outside them
    assert abs(float(cov.trace()) - (p - n) / delta) < 0.1 * (p - n) / delta, float(cov.trace())
    assert float((cov - null / delta).abs().max()) < 0.05, float((cov - null / delta).abs().max())
    assert math.isfinite(fs.info["flow_final_kl"])
