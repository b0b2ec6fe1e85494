"""The bench method registry is open and keyed by name: a user method is found by get_methods and built like the
built-ins; a duplicate name is refused unless replace=True."""

import pytest
import torch
from torch import nn

from posthoc.baselines import MAP
from posthoc.bench import METHODS, BenchContext, get_methods, register_method
from posthoc.predictive import LinkApprox

NAME = "user_map_registry_test"


@pytest.fixture
def user_method():
    spec = register_method(NAME, lambda ctx: MAP(ctx.model), "a user's method", link_approx="mc")
    try:
        yield spec
    finally:
        METHODS.pop(NAME, None)


def _context(model: nn.Module) -> BenchContext:
    return BenchContext(model=model, suite=None, train_loader=None, val_loader=None, context_loader=None, seed=0,
                        progress=False)


def test_user_method_is_looked_up_and_built(user_method):
    (spec,) = get_methods([NAME])
    assert spec is user_method and spec.link_approx is LinkApprox.MC and not spec.shards_fit
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    torch.testing.assert_close(spec.build(_context(model)).predict(x).mean, model(x).detach())
    assert [s.name for s in get_methods(["map", NAME])] == ["map", NAME]


def test_duplicates_are_refused_unless_replace(user_method):
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        register_method(NAME, lambda ctx: None, "dup")
    assert METHODS[NAME] is user_method
    replaced = register_method(NAME, lambda ctx: None, "replaced", replace=True)
    assert METHODS[NAME] is replaced and replaced.description == "replaced"


def test_bad_registrations_fail_and_leave_the_registry_alone():
    before = dict(METHODS)
    with pytest.raises(ValueError, match="non-empty string"):
        register_method("", lambda ctx: None, "no name")
    with pytest.raises(TypeError, match="callable"):
        register_method(NAME, "not a builder", "bad")
    with pytest.raises(ValueError):
        register_method(NAME, lambda ctx: None, "bad link", link_approx="nope")
    assert METHODS == before
