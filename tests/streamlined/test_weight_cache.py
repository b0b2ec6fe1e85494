"""The rules' caches (W̄², W̄² + Var W, stand-in layers, the walk's graph plan): reused while unchanged, never stale, never keeping a model alive."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from posthoc.streamlined import Streamlined
from posthoc.streamlined.rules.weight_cache import IdentityMap, cached_on

DTYPE = torch.float64


def test_cache_hits_and_misses_follow_the_tensors_versions_and_identity() -> None:
    weight = torch.randn(3, 4, dtype=DTYPE)
    variance = torch.rand(3, 4, dtype=DTYPE)
    first = cached_on((weight, variance), "t", lambda: weight + variance)
    assert cached_on((weight, variance), "t", lambda: weight + variance) is first
    weight.mul_(2)  # an in-place write bumps the version counter
    second = cached_on((weight, variance), "t", lambda: weight + variance)
    torch.testing.assert_close(second, weight + variance)
    other = variance.clone()  # another posterior: another tensor object, same values and version
    assert cached_on((weight, other), "t", lambda: weight + other) is not second
    with torch.no_grad():
        variance.add_(1.0)
    torch.testing.assert_close(cached_on((weight, variance), "t", lambda: weight + variance), weight + variance)


def test_identity_map_keys_by_identity_and_forgets_collected_keys() -> None:
    import gc

    cache: IdentityMap[torch.Tensor, str] = IdentityMap()
    a, b = torch.zeros(3), torch.zeros(3)  # equal values, two objects
    assert cache.set(a, "a") == "a" and cache.get(a) == "a" and cache.get(b) is None
    cache.set(b, "b")
    cache.set(a, "a2")
    assert (cache.get(a), cache.get(b), len(cache)) == ("a2", "b", 2)
    del a
    gc.collect()
    assert len(cache) == 1  # the collected key's entry went with it
    for _ in range(50):  # new objects may reuse a dead key's id: they never see its value
        assert cache.get(torch.zeros(3)) is None


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(x.shape[0], 3, 4)
        return self.head(self.attn(tokens, tokens, tokens, need_weights=False)[0].flatten(1))


def _conv1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(18, 4))


def _hf_conv1d() -> nn.Module:
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    return nn.Sequential(nn.Flatten(), conv1d(5, 12), nn.Tanh(), conv1d(3, 5))


MODELS = {  # name: (model, input shape, the parameter changed in place)
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1),
                                     nn.Flatten(), nn.Linear(48, 4)), (2, 4, 4), "2.weight"),
    "conv1d as conv2d": (_conv1d, (2, 6), "0.weight"),
    "transformers Conv1D as linear": (_hf_conv1d, (2, 6), "1.weight"),
    "multihead attention projections": (_Attention, (12,), "attn.in_proj_weight"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_predictions_follow_weights_changed_in_place_between_calls(name: str) -> None:
    build, shape, changed = MODELS[name]
    torch.manual_seed(0)
    model = build().to(DTYPE).eval()
    variances = {n: 0.01 * torch.rand_like(p) for n, p in model.named_parameters()}
    x = torch.randn(5, *shape, dtype=DTYPE)
    sp = Streamlined(model, weight_var=variances)
    before = sp.predict(x).var
    assert torch.equal(sp.predict(x).var, before)  # the second call reads the cache
    with torch.no_grad():
        dict(model.named_parameters())[changed].mul_(1.5)
        variances[changed].mul_(3.0)
    after = sp.predict(x)
    # a copy of the model: new parameters, so nothing cached from the first model's reaches it
    twin = copy.deepcopy(model)
    fresh = Streamlined(twin, weight_var={k: v.clone() for k, v in variances.items()}).predict(x)
    torch.testing.assert_close(after.var, fresh.var, rtol=1e-12, atol=0)
    torch.testing.assert_close(after.mean, model(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(after.var, before)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_caches_do_not_keep_a_model_alive(name: str) -> None:
    import gc
    import weakref

    build, shape, _ = MODELS[name]
    model = build().to(DTYPE).eval()
    sp = Streamlined(model, weight_var={n: 0.01 * torch.rand_like(p) for n, p in model.named_parameters()})
    sp.predict(torch.randn(2, *shape, dtype=DTYPE))
    refs = [weakref.ref(p) for p in model.parameters()] + [weakref.ref(model)]
    if sp._traced is not None:
        refs.append(weakref.ref(sp._traced))
    del sp, model
    gc.collect()
    assert all(ref() is None for ref in refs)
