"""Shared checks of the fiber sampler's checkpoints (imported by the stage-2 tests)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from posthoc.fiber import FiberSampler
from posthoc.fiber.sampler import _Interrupted


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
    fs._stop_after_flow_step = 12
    with pytest.raises(_Interrupted):
        fs.fit(shuffled_loader(x, y, 1), checkpoint=path)
    assert torch.load(path, weights_only=False)["stage"] == "deform"
    resumed = FiberSampler(model, "classification", **settings).fit(shuffled_loader(x, y, 2), checkpoint=path)
    torch.testing.assert_close(resumed.sample(4), reference.sample(4), rtol=0, atol=0)
    untimed = lambda info: {k: v for k, v in info.items() if not k.endswith("_s")}  # noqa: E731 - wall times differ
    assert untimed(resumed.info) == untimed(reference.info)
    loaded = FiberSampler(model, "classification", **settings).load_state_dict(reference.state_dict())
    torch.testing.assert_close(loaded.sample(3), reference.sample(3), rtol=0, atol=0)
    return reference
