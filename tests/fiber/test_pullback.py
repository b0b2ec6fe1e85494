"""Stage 2's ``pullback`` map (the default): new samples, within the tolerance, the move and pull-back against a
dense float64 reference, the state round trip, and the FutureWarning for the old default's settings."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from fiber.common import shuffled_loader
from references import DTYPE
from torch.func import jacrev

from posthoc.fiber import DeformConfig, FiberSampler
from posthoc.fiber.pullback import PullbackMove, nearest_neighbour_distances, novelty
from posthoc.fiber.stage2 import get_deform
from posthoc.fiber.walk import full_data_nll, mean_nll

WALK = dict(n_particles=4, steps=24, burn_in=8, thin=2, step_size=3e-3, batch_size=8, cg_steps=4,
            loss_tolerance=0.05, n_check=16, progress=False)


def fitted(model, x, y, **settings) -> FiberSampler:
    return FiberSampler(model, "classification", **{**WALK, **settings}).fit(shuffled_loader(x, y, 0))


def test_novelty_against_a_hand_computed_case():
    """Walked samples 0, 1, 3 on a line: nearest-neighbour distances 1, 1, 2 (median 1); samples at 0.5, 3 and 2 are
    0.5, 0 and 1 from the nearest walked sample (median 0.5), so the novelty is 0.5; resampling the walk gives 0."""
    walked = torch.tensor([[0.0], [1.0], [3.0]], dtype=DTYPE)
    torch.testing.assert_close(nearest_neighbour_distances(walked), torch.tensor([1.0, 1.0, 2.0], dtype=DTYPE))
    assert novelty(torch.tensor([[0.5], [3.0], [2.0]], dtype=DTYPE), walked) == pytest.approx(0.5, abs=1e-15)
    assert novelty(walked[[2, 0, 1, 1]], walked) == 0.0
    with pytest.raises(ValueError, match="at least 2 points"):
        nearest_neighbour_distances(walked[:1])
    with pytest.raises(ValueError, match="median nearest-neighbour distance 0"):  # no move scale
        PullbackMove(walked[[0, 0, 1, 1, 2]], step_scale=0.7)


def test_default_stage2_draws_new_samples_within_the_tolerance(problem):
    """The default map's samples are new: median distance to the nearest walked sample >= 0.5 x the walked samples'
    median nearest-neighbour distance (resampling the walk: 0, the old anchored jitter's ~0.004 of the spread
    fails too), and >= 0.9 of them are within the tolerance on all training data (the pull-back fits 16 of 40)."""
    model, x, y = problem
    fs = fitted(model, x, y, subsample_size=16)
    assert fs.deform_config.kind == "pullback" and fs.deform_config.step_scale == 0.7
    samples = fs.sample(48, seed=3)
    anchors = fs.flow.anchors
    assert novelty(samples, anchors) >= 0.5
    assert novelty(anchors[torch.randint(len(anchors), (48,))], anchors) == 0.0  # what the test rules out
    nll = full_data_nll(fs._problem_cache, samples)
    assert float((nll <= fs.map_nll + fs.config.loss_tolerance).double().mean()) >= 0.9
    assert fs.info["stage2_within_tol"] >= 0.9 and fs.info["pullback_accepted"] >= 0.5
    assert fs.info["pullback_novelty"] >= 0.5


def test_move_and_pullback_match_a_dense_reference(problem):
    """Float64, exact solves (pull-back set of 4 examples x 3 classes, CG 14 steps, no damping): every sample is
    anchor + (I - J^+ J)(-(tau/2) delta anchor + sqrt(tau) xi) followed by Gauss-Newton steps theta += J(theta)^+
    (f* - f(theta)) while the pull-back set's NLL is above the threshold (at most pullback_steps), with J from
    jacrev and the same draws; a rejected move gives the anchor."""
    # Moves of 10x the walked samples' spacing leave the low-loss set, so most draws take Gauss-Newton steps (at
    # 1.5x and 6 draws none stepped on an AVX512 machine, where the walk differs from earlier ones in its last bits).
    STEP_SCALE, N_DRAWS = 10.0, 12
    model, x, y = problem
    fs = fitted(model, x, y, subsample_size=4, cg_steps=14, damping=0.0, pullback_steps=3, step_scale=STEP_SCALE)
    move: PullbackMove = fs.flow
    data = move.pullback_set
    generator = torch.Generator().manual_seed(5)
    samples, accepted, index = move.draw(fs, N_DRAWS, generator)
    generator = torch.Generator().manual_seed(5)
    ref_index = torch.randint(move.anchors.shape[0], (N_DRAWS,), generator=generator)
    noise = torch.randn((N_DRAWS, fs.n_params), generator=generator, dtype=DTYPE)
    assert torch.equal(index, ref_index)
    assert move.tau == pytest.approx((STEP_SCALE * float(nearest_neighbour_distances(move.anchors).median())) ** 2
                                     / fs.n_params, rel=1e-12)

    def outputs(theta: torch.Tensor) -> torch.Tensor:
        return fs.subset.forward(data["inputs"], theta).reshape(-1)

    def nll(theta: torch.Tensor) -> float:
        out = fs.subset.forward(data["inputs"], theta).unsqueeze(0)
        return float(mean_nll(out, data["targets"], fs.likelihood, fs.sigma_noise)[0])

    n_stepped = 0
    for k in range(N_DRAWS):
        anchor = move.anchors[ref_index[k]]
        jac = jacrev(outputs)(anchor)
        raw = -0.5 * move.tau * fs.prior_precision * anchor + math.sqrt(move.tau) * noise[k]
        theta = anchor + raw - torch.linalg.pinv(jac) @ (jac @ raw)
        ok = nll(theta) <= data["threshold"]
        for _ in range(fs.config.pullback_steps):
            if ok:
                break
            theta = theta + torch.linalg.pinv(jacrev(outputs)(theta)) @ (data["reference"].reshape(-1) - outputs(theta))
            n_stepped += 1
            ok = nll(theta) <= data["threshold"]
        assert bool(accepted[k]) == ok
        expected = theta if ok else anchor
        torch.testing.assert_close(samples[k], expected, rtol=0, atol=1e-8 * float(expected.norm()))
    assert n_stepped > 0  # the Gauss-Newton branch was exercised


def test_state_round_trip_and_checkpoint_reload_without_data(problem, tmp_path):
    """The pull-back set travels in the state (and the weights-only checkpoint): a loaded sampler draws the same
    samples; a refit with the finished checkpoint loads it. A walk without 2 samples within the tolerance anchors
    the moves at all walked samples and warns."""
    model, x, y = problem
    fs = FiberSampler(model, "classification", **WALK, subsample_size=16).fit(shuffled_loader(x, y, 0),
                                                                               checkpoint=tmp_path / "f.pt")
    loaded = FiberSampler(model, "classification", **WALK, subsample_size=16).load_state_dict(fs.state_dict())
    torch.testing.assert_close(loaded.sample(5), fs.sample(5), rtol=0, atol=0)
    again = FiberSampler(model, "classification", **WALK, subsample_size=16).fit(shuffled_loader(x, y, 1),
                                                                                  checkpoint=tmp_path / "f.pt")
    torch.testing.assert_close(again.sample(5), fs.sample(5), rtol=0, atol=0)
    # fewer than 2 walked samples within the tolerance: every walked sample anchors a move, with a warning
    fs.particle_nll = fs.particle_nll + 1.0
    with pytest.warns(UserWarning, match="0 walked sample"):
        move = get_deform("pullback").build(fs)
    assert torch.equal(move.anchors, fs.particles)


def test_old_default_flow_settings_warn_and_explicit_kinds_do_not():
    """Flow settings without a kind meant the coupling flow until issue 17; now they warn (FutureWarning) that the
    default map ignores them. An explicit kind, or the defaults alone, stays silent."""
    with pytest.warns(FutureWarning, match="deform='flow' to keep"):
        config = DeformConfig(latent_dim=4, flow_steps=10)
    assert config.kind == "pullback"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DeformConfig(kind="flow", latent_dim=4).kind == "flow"
        assert DeformConfig().kind == "pullback"
        assert DeformConfig(step_scale=0.5).step_scale == 0.5
    with pytest.raises(ValueError, match="step_scale"):
        DeformConfig(step_scale=0.0)
