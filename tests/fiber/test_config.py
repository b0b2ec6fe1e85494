"""FiberSampler's settings as config objects (WalkConfig, DeformConfig) and the open registry of stage-2 maps."""

from __future__ import annotations

import pytest
import torch
from fiber.common import (
    SMALL_SETTINGS,
    Interrupted,
    shuffled_loader,
    stop_after,
)
from torch import nn

from posthoc.fiber import (
    DEFORMS,
    DeformConfig,
    DeformKind,
    DeformMethod,
    FiberSampler,
    WalkConfig,
    get_deform,
    register_deform,
)
from posthoc.fiber.config import WALK_KEYWORDS


def _split(settings: dict) -> tuple[WalkConfig, DeformConfig, dict]:
    """The flat keywords as (WalkConfig, DeformConfig, the remaining sampler keywords)."""
    walk = {k: v for k, v in settings.items() if k in WALK_KEYWORDS}
    walk.setdefault("burn_in", walk["steps"] // 2)
    deform_fields = set(DeformConfig.__dataclass_fields__) - {"kind"}
    deform = {k: v for k, v in settings.items() if k in deform_fields}
    rest = {k: v for k, v in settings.items() if k not in WALK_KEYWORDS and k not in deform_fields and k != "deform"}
    return WalkConfig(**walk), DeformConfig(kind=settings.get("deform", "flow"), **deform), rest


@pytest.mark.parametrize("deform", ["anchored", "variational"])
def test_config_objects_give_the_same_sampler_as_keywords(problem, deform):
    model, x, y = problem
    settings = {**SMALL_SETTINGS, "deform": deform, "flow_loss_samples": 4}
    walk, deform_config, rest = _split(settings)
    from_keywords = FiberSampler(model, "classification", **settings)
    from_configs = FiberSampler(model, "classification", walk=walk, deform=deform_config, **rest)
    assert from_configs._settings() == from_keywords._settings()  # the checkpoints' fingerprint
    assert from_configs.config == from_keywords.config and from_configs.deform_config == from_keywords.deform_config
    from_keywords.fit(shuffled_loader(x, y, 0))
    from_configs.fit(shuffled_loader(x, y, 0))
    torch.testing.assert_close(from_configs.sample(5), from_keywords.sample(5), rtol=0, atol=0)
    # a config for one stage, keywords for the other
    mixed = FiberSampler(model, "classification", walk=walk, deform=deform, **{
        k: v for k, v in settings.items() if k not in WALK_KEYWORDS and k != "deform"})
    assert mixed._settings() == from_keywords._settings()


def test_a_stage_given_twice_or_unknown_keywords_are_errors(problem):
    model, _, _ = problem
    with pytest.raises(ValueError, match=r"walk settings were given twice.*steps"):
        FiberSampler(model, "classification", walk=WalkConfig(), steps=100)
    with pytest.raises(ValueError, match=r"stage-2 settings were given twice.*flow_steps"):
        FiberSampler(model, "classification", deform=DeformConfig(kind="flow"), flow_steps=10)
    with pytest.raises(TypeError, match="flow_stepz"):
        FiberSampler(model, "classification", flow_stepz=10)
    with pytest.raises(TypeError, match="WalkConfig"):
        FiberSampler(model, "classification", walk={"steps": 10})
    with pytest.raises(ValueError, match="deform"):
        DeformConfig(kind="anchors")
    with pytest.raises(ValueError, match="flow_hidden"):
        DeformConfig(flow_hidden=0)


def test_stage2_attributes_read_and_replace_the_config(problem):
    model, _, _ = problem
    fs = FiberSampler(model, "classification", deform="anchored")
    assert fs.deform is DeformKind.ANCHORED and fs.deform_config.barrier_weight is None
    assert (fs.barrier_weight, fs.variational_init_scale) == (300.0, 0.01)  # the anchored map's defaults
    fs.deform = DeformKind.VARIATIONAL
    assert fs.deform_config.kind == "variational" and fs.barrier_weight == 100.0
    fs.barrier_weight, fs.flow_steps = 50.0, 7
    assert fs.deform_config == DeformConfig(kind="variational", barrier_weight=50.0, flow_steps=7)
    with pytest.raises(ValueError, match="flow_steps"):
        fs.flow_steps = -1


class ScaledGaussian(DeformMethod):
    """A user's map: N(0, diag(exp(2 a))) in the whitened principal coordinates, a (r,) trained by maximum
    likelihood on the walked samples' coordinates, plus a random draw per step (so resuming needs the generator)."""

    def trains(self, fs) -> bool:
        return fs.deform_config.flow_steps > 0

    def build(self, fs) -> nn.Module:
        module = nn.Module()
        module.log_scale = nn.Parameter(torch.zeros(fs.coords.rank, dtype=fs.subset.dtype))
        return module

    def training_step(self, fs, problem, module, optimizer, coords, generator):
        def step() -> float:
            pick = torch.randint(coords.shape[0], (coords.shape[0],), generator=generator)
            optimizer.zero_grad()
            scale = torch.exp(module.log_scale)
            loss = (0.5 * (coords[pick] / scale) ** 2 + module.log_scale).sum(-1).mean()
            loss.backward()
            optimizer.step()
            return float(loss.detach())
        return step

    def sample(self, fs, module, n_samples, generator):
        z = torch.randn((n_samples, fs.coords.rank), generator=generator, dtype=fs.subset.dtype)
        with torch.no_grad():
            return fs.coords.decode(z * torch.exp(module.log_scale))

    def settings(self, fs):
        return {"scaled_gaussian": 1}


@pytest.fixture
def scaled_gaussian():
    method = register_deform("scaled_gaussian", ScaledGaussian())
    yield method
    DEFORMS.pop("scaled_gaussian")


def test_a_registered_user_deform_fits_samples_and_resumes(problem, scaled_gaussian, tmp_path):
    model, x, y = problem
    assert get_deform("scaled_gaussian") is scaled_gaussian
    with pytest.raises(ValueError, match="already registered"):
        register_deform("scaled_gaussian", ScaledGaussian())
    with pytest.raises(ValueError, match="already registered"):
        register_deform("flow", ScaledGaussian())
    with pytest.raises(TypeError, match="DeformMethod"):
        register_deform("other", object())
    settings = {**SMALL_SETTINGS, "deform": "scaled_gaussian"}
    reference = FiberSampler(model, "classification", **settings).fit(shuffled_loader(x, y, 0))
    assert reference.deform == "scaled_gaussian" and reference._settings()["scaled_gaussian"] == 1
    assert torch.isfinite(torch.tensor(reference.info["flow_final_nll"]))
    thetas = reference.sample(4)
    assert thetas.shape == (4, reference.n_params) and not torch.allclose(thetas[0], thetas[1])
    path = tmp_path / "fiber.pt"
    with pytest.raises(Interrupted):
        FiberSampler(model, "classification", **settings).fit(shuffled_loader(x, y, 1), checkpoint=path,
                                                               callback=stop_after("deform", 6))
    resumed = FiberSampler(model, "classification", **settings).fit(shuffled_loader(x, y, 2), checkpoint=path)
    torch.testing.assert_close(resumed.sample(4), thetas, rtol=0, atol=0)
    loaded = FiberSampler(model, "classification", **settings).load_state_dict(reference.state_dict())
    torch.testing.assert_close(loaded.sample(4), thetas, rtol=0, atol=0)
    # replace=True swaps the method behind the name
    replacement = register_deform("scaled_gaussian", ScaledGaussian(), replace=True)
    assert get_deform("scaled_gaussian") is replacement is not scaled_gaussian
