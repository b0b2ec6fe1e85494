"""The rules' cache of W̄² and W̄² + Var W: reused while the weights and variances are unchanged, never stale."""

from __future__ import annotations

import torch
from torch import nn

from posthoc.streamlined import Streamlined
from posthoc.streamlined.rules.affine import derived_from_weight

DTYPE = torch.float64


def test_cache_hits_and_misses_follow_the_tensors_versions_and_identity() -> None:
    weight = torch.randn(3, 4, dtype=DTYPE)
    variance = torch.rand(3, 4, dtype=DTYPE)
    first = derived_from_weight(weight, "t", lambda: weight + variance, variance)
    assert derived_from_weight(weight, "t", lambda: weight + variance, variance) is first
    weight.mul_(2)  # an in-place write bumps the version counter
    second = derived_from_weight(weight, "t", lambda: weight + variance, variance)
    torch.testing.assert_close(second, weight + variance)
    other = variance.clone()  # another posterior: another tensor object, same values and version
    assert derived_from_weight(weight, "t", lambda: weight + other, other) is not second
    with torch.no_grad():
        variance.add_(1.0)
    torch.testing.assert_close(derived_from_weight(weight, "t", lambda: weight + variance, variance), weight + variance)


def test_predictions_follow_weights_changed_in_place_between_calls() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.Flatten(),
                          nn.Linear(48, 4)).to(DTYPE).eval()
    variances = {name: 0.01 * torch.rand_like(p) for name, p in model.named_parameters()}
    x = torch.randn(5, 2, 4, 4, dtype=DTYPE)
    sp = Streamlined(model, weight_var=variances)
    before = sp.predict(x).var
    assert torch.equal(sp.predict(x).var, before)  # the second call reads the cache
    with torch.no_grad():
        model[2].weight.mul_(1.5)
        variances["2.weight"].mul_(3.0)
    after = sp.predict(x)
    fresh = Streamlined(model, weight_var={k: v.clone() for k, v in variances.items()}).predict(x)
    torch.testing.assert_close(after.var, fresh.var, rtol=1e-12, atol=0)
    torch.testing.assert_close(after.mean, model(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(after.var, before)
