"""Stage 2's ``anchored`` map: a mixture on the fiber (walked samples plus a learned jitter), its objective,
exact resume and state round trip through the sampler, and its errors."""

from __future__ import annotations

import pytest
import torch
from fiber.common import assert_stage2_resumes_exactly, fit_on_linear_fiber, shuffled_loader, trained_classifier
from references import DTYPE

from posthoc.fiber import FiberSampler
from posthoc.fiber.deform import AnchoredJitter, anchored_training_step
from posthoc.fiber.stage2 import get_deform

SETTINGS = dict(n_particles=3, steps=20, burn_in=8, thin=3, step_size=3e-3, batch_size=8, subsample_size=16,
                cg_steps=3, loss_tolerance=0.05, latent_dim=3, flow_steps=20, flow_loss_samples=4, n_check=8,
                checkpoint_every=4, progress=False, deform="anchored")


@pytest.fixture(scope="module")
def problem():
    return trained_classifier()


def test_jitter_map_decodes_in_the_shared_basis_and_respects_room():
    """theta - anchor = U diag(sigma * room_m * s) u exactly; an anchor with no room is returned as is."""
    generator = torch.Generator().manual_seed(0)
    anchors = torch.randn(4, 7, generator=generator, dtype=DTYPE)
    basis, _ = torch.linalg.qr(torch.randn(7, 2, generator=generator, dtype=DTYPE))
    scales, room = torch.tensor([2.0, 0.5], dtype=DTYPE), torch.tensor([1.0, 0.5, 0.0, 0.25], dtype=DTYPE)
    jitter = AnchoredJitter(anchors, room, basis, scales, init_scale=0.3)
    index, u = jitter.draw(50, generator)
    with torch.no_grad():
        thetas, log_q = jitter.sample_with_log_prob(index, u)
    offsets = thetas - anchors[index]
    torch.testing.assert_close(offsets @ basis, u * 0.3 * scales * room[index].unsqueeze(-1), rtol=0, atol=1e-12)
    assert float(offsets[index == 2].abs().max()) == 0.0 and bool((index == 2).any())
    assert set(index.tolist()) == {0, 1, 2, 3}  # uniform over the anchors: 50 draws hit all 4
    torch.testing.assert_close(log_q, -0.5 * (u**2).sum(-1) - 0.5 * 2 * torch.log(torch.tensor(2 * torch.pi,
                               dtype=DTYPE)) - 2 * torch.log(torch.tensor(0.3, dtype=DTYPE)))


def test_jitter_objective_recovers_the_prior_scale():
    """One anchor orthogonal to span(U) and the target N(0, delta^-1 I) (no barrier): the reverse KL's optimum is
    sigma_i s_i = delta^-1/2 exactly (the Gaussian in the slice through the anchor). A wrong entropy sign would
    collapse sigma to 0, a missing prior term would grow it without bound."""
    torch.set_num_threads(1)
    delta = 4.0
    basis = torch.eye(5, dtype=DTYPE)[:, :2]
    anchor = torch.tensor([[0.0, 0.0, 1.0, -1.0, 0.5]], dtype=DTYPE)
    scales = torch.tensor([1.0, 3.0], dtype=DTYPE)
    jitter = AnchoredJitter(anchor, torch.ones(1, dtype=DTYPE), basis, scales, init_scale=0.01)
    optimizer = torch.optim.Adam(jitter.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(3)
    for _ in range(600):
        index, u = jitter.draw(64, generator)
        anchored_training_step(jitter, optimizer, index, u, lambda th: 0.5 * delta * (th**2).sum(-1))
    # Monte-Carlo noise of the 64-draw gradients and Adam's stationary jitter at lr 0.05: a few percent; 10 % is well
    # above that and far below a collapse (-> 0.01) or a runaway
    got = torch.exp(jitter.log_sigma.detach()) * scales
    assert float((got * delta**0.5 - 1).abs().max()) < 0.1, got


def test_anchored_samples_stay_on_a_linear_fiber():
    """On f(x) = x^T theta the walked samples differ by vectors of null(X), so the shared basis lies in null(X) and
    every anchored sample keeps the training outputs exactly (the check reports 1.0 within the tolerance)."""
    fs, x, theta, _ = fit_on_linear_fiber("anchored", n_particles=4, steps=20, burn_in=10, thin=2, step_size=0.05,
                                          flow_steps=50, flow_lr=0.05, flow_loss_samples=8)
    assert fs.info["stage2_within_tol"] == 1.0
    samples = fs.sample(200, seed=3)
    assert float((samples @ x.T - x @ theta).abs().max()) < 1e-9
    # the jitter moved the samples off their anchors (the barrier never acts here: outputs do not change)
    assert fs.info["anchored_jitter_over_anchor_spread"] > 0.05 and fs.info["anchored_sigma_mean"] > 0.01


def test_anchored_resumes_exactly_and_round_trips(problem, tmp_path):
    model, x, y = problem
    reference = assert_stage2_resumes_exactly(model, x, y, SETTINGS, tmp_path)
    assert reference.info["anchored_jitter_over_anchor_spread"] > 0 and "stage2_nll_excess_mean" in reference.info
    state = reference.state_dict()
    assert "anchors" not in state["flow"]  # the anchors are the saved particles, not stored twice
    loaded = FiberSampler(model, "classification", **SETTINGS).load_state_dict(state)
    torch.testing.assert_close(loaded.sample(3), reference.sample(3), rtol=0, atol=0)
    torch.testing.assert_close(loaded.predict(x[:4], n_samples=5).samples,
                               reference.predict(x[:4], n_samples=5).samples, rtol=0, atol=0)
    for other in ({"barrier_weight": 50.0}, {"variational_init_scale": 0.2}, {"deform": "variational"}):
        with pytest.raises(ValueError, match="other settings"):
            FiberSampler(model, "classification", **{**SETTINGS, **other}).load_state_dict(state)


def test_anchored_errors(problem):
    model, x, y = problem
    with pytest.raises(ValueError, match="deform"):
        FiberSampler(model, "classification", deform="anchors")
    with pytest.raises(ValueError, match="barrier_weight"):
        FiberSampler(model, "classification", deform="anchored", barrier_weight=-1.0)
    with pytest.raises(ValueError, match="variational_init_scale"):
        FiberSampler(model, "classification", deform="anchored", variational_init_scale=0.0)
    with pytest.raises(ValueError, match="basis"):
        AnchoredJitter(torch.zeros(3, 5), torch.ones(3), torch.zeros(4, 2), torch.ones(2), 0.1)
    with pytest.raises(ValueError, match="room"):
        AnchoredJitter(torch.zeros(3, 5), torch.ones(2), torch.zeros(5, 2), torch.ones(2), 0.1)
    fs = FiberSampler(model, "classification", **{**SETTINGS, "flow_steps": 0, "n_check": 0}).fit(shuffled_loader(x, y, 0))
    fs.particle_nll = torch.full_like(fs.particle_nll, fs.map_nll + 1.0)  # as if no walked sample kept the tolerance
    with pytest.raises(ValueError, match="no walked sample is within the loss tolerance"):
        get_deform("anchored").build(fs)
