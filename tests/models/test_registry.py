"""The model registry is open and keyed by name: a user factory is built by build_model with its kwargs; a
duplicate name is refused unless replace=True."""

import pytest
import torch
from torch import nn

from posthoc.models import MODELS, build_model, register_model
from posthoc.models.mlp import MLP

NAME = "user_model_registry_test"


def _tiny(n_out: int = 2) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, n_out))


@pytest.fixture
def user_model():
    register_model(NAME, _tiny)
    try:
        yield _tiny
    finally:
        MODELS.pop(NAME, None)


def test_user_model_is_built_with_its_kwargs(user_model):
    model = build_model(NAME, n_out=5)
    assert model(torch.randn(2, 3)).shape == (2, 5)


def test_duplicates_are_refused_unless_replace(user_model):
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        register_model(NAME, MLP)
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp", MLP)  # a built-in is protected too
    assert MODELS[NAME] is _tiny
    register_model(NAME, lambda **kw: MLP(3, **kw), replace=True)
    assert isinstance(build_model(NAME, flatten=False), MLP)


def test_bad_registrations_and_unknown_names_fail_clearly(user_model):
    with pytest.raises(ValueError, match="non-empty string"):
        register_model("", _tiny)
    with pytest.raises(TypeError, match="callable"):
        register_model("not_callable", 3)
    assert "" not in MODELS and "not_callable" not in MODELS
    with pytest.raises(ValueError, match=f"unknown model 'nope'; choose one of .*'{NAME}'.*register_model"):
        build_model("nope")
