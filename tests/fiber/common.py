"""Problems and checks shared by the fiber sampler's tests."""

from __future__ import annotations

import pytest
import torch
from references import DTYPE, linear_gaussian_fiber, small_mlp
from torch.utils.data import DataLoader, TensorDataset

from posthoc.fiber import FiberSampler
from posthoc.utils.checkpoint import read_checkpoint

# A short flow-stage-2 run on trained_classifier's problem (seconds), shared by the sampler's tests (the flow by
# name: the default stage 2 is "pullback" since issue 17, tests/fiber/test_pullback.py).
SMALL_SETTINGS = dict(deform="flow", n_particles=3, steps=20, burn_in=8, thin=3, step_size=3e-3, batch_size=8,
                      subsample_size=16,
                      cg_steps=3, loss_tolerance=0.05, latent_dim=3, flow_layers=2, flow_hidden=8, flow_steps=20,
                      n_check=4, checkpoint_every=4, progress=False)


def trained_classifier() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A 3-8-3 MLP trained (150 Adam steps) on 40 points of a 3-class problem: (model in eval mode, x, y)."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=generator, dtype=DTYPE)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    model = small_mlp(n_in=3, n_hidden=8, n_out=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), x, y


# the linear-Gaussian fiber problem of fit_on_linear_fiber: N examples, P parameters, prior precision, noise
LINEAR_N, LINEAR_P, LINEAR_DELTA, LINEAR_SIGMA = 4, 10, 2.0, 0.3


def fit_on_linear_fiber(deform: str, **settings) -> tuple[FiberSampler, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FiberSampler fitted on f(x) = x^T theta with P > N (LINEAR_*), exact projections
    (full batch, CG to N + 2 steps, no damping) and latent P - N; ``settings`` add the walk and map settings.
    Returns (sampler, x, theta*, null-space basis)."""
    torch.set_num_threads(1)
    n, p, delta, sigma = LINEAR_N, LINEAR_P, LINEAR_DELTA, LINEAR_SIGMA
    model, x, y, theta, null = linear_gaussian_fiber(n, p, delta, sigma)
    fs = FiberSampler(model, "regression", prior_precision=delta, sigma_noise=sigma, batch_size=n, subsample_size=n,
                      cg_steps=n + 2, damping=0.0, loss_tolerance=1e-3, latent_dim=p - n, deform=deform, n_check=16,
                      progress=False, **settings)
    fs.fit(DataLoader(TensorDataset(x, y), batch_size=n))
    return fs, x, theta, null


class Interrupted(Exception):
    """Raised from a fit's callback to simulate a crash."""


def stop_after(stage: str, step: int):
    """A fit callback that raises Interrupted after ``step`` steps of ``stage`` ("walk" or "deform")."""
    def callback(at_stage: str, at_step: int) -> None:
        if at_stage == stage and at_step >= step:
            raise Interrupted(f"stopped after {stage} step {at_step}")
    return callback


def shuffled_loader(x: torch.Tensor, y: torch.Tensor, seed: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))


def assert_stage2_resumes_exactly(model, x, y, settings: dict, tmp_path) -> FiberSampler:
    """Fit once; fit again interrupted after flow step 12 and resumed (other loader orders): the resumed
    sampler's samples and (untimed) info equal the uninterrupted one's bit for bit, and so do the samples of a
    state-dict round trip.
    Returns the uninterrupted sampler."""
    reference = FiberSampler(model, "classification", **settings).fit(shuffled_loader(x, y, 0))
    assert 0.0 <= reference.info["stage2_within_tol"] <= 1.0 and "flow_final_kl" in reference.info
    assert not torch.allclose(reference.sample(2)[0], reference.sample(2)[1])
    path = tmp_path / "fiber.pt"
    fs = FiberSampler(model, "classification", **settings)
    with pytest.raises(Interrupted):
        fs.fit(shuffled_loader(x, y, 1), checkpoint=path, callback=stop_after("deform", 12))
    assert read_checkpoint(path, "FiberSampler").payload["stage"] == "deform"
    resumed = FiberSampler(model, "classification", **settings).fit(shuffled_loader(x, y, 2), checkpoint=path)
    torch.testing.assert_close(resumed.sample(4), reference.sample(4), rtol=0, atol=0)
    untimed = lambda info: {k: v for k, v in info.items() if not k.endswith("_s")}  # noqa: E731 - wall times differ
    assert untimed(resumed.info) == untimed(reference.info)
    loaded = FiberSampler(model, "classification", **settings).load_state_dict(reference.state_dict())
    torch.testing.assert_close(loaded.sample(3), reference.sample(3), rtol=0, atol=0)
    return reference
