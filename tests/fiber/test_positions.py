"""FiberSampler on outputs with positions (B, T, C): one observation per kept position, targets -100 skipped.

A tiny per-token model in float64 (inputs (B, T, D), a causal running mean that mixes the positions, a per-token
head). The projection's output Jacobian rows are compared with a dense torch.func.jacrev, the projection with
the dense formula over the kept rows, the loss with PyTorch's cross-entropy (ignore_index=-100, mean over the
kept positions).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from posthoc.fiber import FiberSampler, projection, register_deform
from posthoc.fiber.projection import jvp_at, project_null, vjp_at
from posthoc.fiber.stage2 import DEFORMS, DeformMethod
from posthoc.fiber.walk import kept_outputs, mean_nll
from posthoc.laplace.predict import PositionPredictive
from posthoc.likelihood import Likelihood
from posthoc.network.subset import ParameterSubset

DTYPE = torch.float64
B, T, D, C = 4, 5, 3, 3
SETTINGS = dict(n_particles=2, steps=6, burn_in=2, thin=2, step_size=1e-3, batch_size=B, subsample_size=B,
                cg_steps=4, n_check=2, progress=False)


class PerToken(nn.Module):
    """(B, T, D) -> (B, T, C): tanh features, a causal running mean over the positions, a per-token head."""

    def __init__(self, mix: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.mix = nn.Linear(D, 16), nn.Linear(16, C), mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        if self.mix:
            h = h.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=h.dtype).unsqueeze(-1)
        return self.head(h)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, T, D) and labels (B, T), -100 at the end of the shorter sequences and at one inner position."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen, dtype=DTYPE)
    y = torch.randint(0, C, (B, T), generator=gen)
    y[1, 3:] = -100
    y[2, 4:] = -100
    y[3, 1] = -100
    return x, y


def _model(mix: bool = True) -> nn.Module:
    return PerToken(mix).to(DTYPE).eval()


def _dense_jacobian(model: nn.Module, subset: ParameterSubset, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """d model(x) / d theta by jacrev over the flat parameter vector: (B, T, C, P)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def f(th: torch.Tensor) -> torch.Tensor:
        parts = torch.split(th, [math.prod(s) for s in shapes])
        return functional_call(model, {n: p.view(s) for n, p, s in zip(names, parts, shapes, strict=True)}, (x,))

    assert subset.n_params == sum(math.prod(s) for s in shapes)
    return jacrev(f)(theta)


@pytest.mark.parametrize("vectorise", [True, False])
def test_jacobian_rows_match_a_dense_jacrev_and_drop_ignored_positions(vectorise):
    model = _model()
    x, y = _data()
    subset = ParameterSubset(model, "all")
    theta_map = subset.theta_map
    gen = torch.Generator().manual_seed(3)
    thetas = torch.stack([theta_map, theta_map + 0.1 * torch.randn(theta_map.shape, generator=gen, dtype=DTYPE)])
    v = torch.randn(2, subset.n_params, generator=gen, dtype=DTYPE)
    u = torch.randn(2, B, T, C, generator=gen, dtype=DTYPE)
    kept = kept_outputs(y, Likelihood.CLASSIFICATION)
    assert kept is not None and int((~kept).sum()) == 4
    for k in range(2):
        jac = _dense_jacobian(model, subset, x, thetas[k]) * kept[..., None, None]  # ignored rows dropped
        torch.testing.assert_close(jvp_at(subset, x, thetas, v, kept, vectorise)[k],
                                   torch.einsum("btcp,p->btc", jac, v[k]), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(vjp_at(subset, x, thetas, u, kept, vectorise)[k],
                                   torch.einsum("btcp,btc->p", jac, u[k]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("route", ["dense", "jvp"])
def test_projection_equals_the_dense_projection_on_the_kept_rows(route, monkeypatch):
    """P v = v - J_k^T (J_k J_k^T + d I)^-1 J_k v with J_k the kept positions' rows; the ignored ones stay free.

    Both routes of the Jacobian products: dense J_k (this problem is small) and JVP / VJP calls.
    """
    if route == "jvp":
        monkeypatch.setattr(projection, "DENSE_JACOBIAN_NUMEL", 0)
    model = _model()
    x, y = _data()
    subset = ParameterSubset(model, "all")
    kept = kept_outputs(y, Likelihood.CLASSIFICATION)
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(1, subset.n_params, generator=gen, dtype=DTYPE)
    jac = _dense_jacobian(model, subset, x, subset.theta_map)  # (B, T, C, P)
    rows = jac[kept].reshape(-1, subset.n_params)  # (R C, P)
    damping = 1e-2  # J_k J_k^T's eigenvalues span 5e-5 .. 40: the damping keeps CG's round-off small
    gram = rows @ rows.T + damping * torch.eye(rows.shape[0], dtype=DTYPE)
    expected = v[0] - rows.T @ torch.linalg.solve(gram, rows @ v[0])
    projected = project_null(subset, x, subset.theta_map.unsqueeze(0), v, cg_steps=4 * rows.shape[0],
                             damping=damping, kept=kept)[0]
    torch.testing.assert_close(projected, expected, rtol=1e-8, atol=1e-10)
    moved = torch.einsum("btcp,p->btc", jac, projected)
    before = torch.einsum("btcp,p->btc", jac, v[0])
    assert float(moved[kept].norm()) < 0.1 * float(before[kept].norm())  # the kept outputs are held (up to damping)
    held = project_null(subset, x, subset.theta_map.unsqueeze(0), v, cg_steps=4 * rows.shape[0], damping=damping)[0]
    moved_if_held = torch.einsum("btcp,p->btc", jac, held)  # every position's rows in J
    assert float(moved[~kept].norm()) > 2 * float(moved_if_held[~kept].norm())  # the ignored ones are freer


def test_loss_is_the_mean_over_kept_positions_and_ignores_the_others():
    x, y = _data()
    with torch.no_grad():
        out = _model()(x)
    nll = mean_nll(out.unsqueeze(0), y, Likelihood.CLASSIFICATION, torch.tensor(1.0))
    expected = nn.functional.cross_entropy(out.reshape(-1, C), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(nll[0], expected, rtol=1e-12, atol=0)
    changed = out.clone()
    changed[y == -100] = 50.0  # outputs at ignored positions do not enter the loss
    torch.testing.assert_close(mean_nll(changed.unsqueeze(0), y, Likelihood.CLASSIFICATION, torch.tensor(1.0)), nll)


def test_inputs_at_ignored_positions_change_nothing():
    """Without mixing, an ignored position's inputs reach only its own outputs, which neither the loss nor the
    projection sees: the walk is the same (the full batch, so the canonical order only permutes examples)."""
    model = _model(mix=False)
    x, y = _data()
    other = x.clone()
    other[y == -100] = torch.randn(int((y == -100).sum()), D, dtype=DTYPE)
    a = FiberSampler(model, "classification", **SETTINGS).fit([(x, y)])
    b = FiberSampler(model, "classification", **SETTINGS).fit([(other, y)])
    assert float((a.particles - a.subset.theta_map).abs().max()) > 1e-4  # the walk moved
    torch.testing.assert_close(a.particles, b.particles, rtol=1e-9, atol=1e-11)
    expected = nn.functional.cross_entropy(model(x).reshape(-1, C), y.reshape(-1), ignore_index=-100)
    assert a.map_nll == pytest.approx(float(expected), rel=1e-12)  # nats per kept position


class _AtTheMap(DeformMethod):
    """Every stage-2 sample is theta*."""

    def sample(self, fs, module, n_samples, generator):
        return fs.subset.theta_map.expand(n_samples, -1).clone()


def test_predictive_has_the_positions_and_its_mean_at_the_map_is_the_model_output():
    model = _model()
    x, y = _data()
    if "test_at_the_map" not in DEFORMS:
        register_deform("test_at_the_map", _AtTheMap())
    fs = FiberSampler(model, "classification", deform="test_at_the_map", **SETTINGS).fit([(x, y)])
    pred = fs.predict(x, n_samples=3)
    assert isinstance(pred, PositionPredictive)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(pred.mean, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(fs(x, n_samples=3), torch.softmax(expected, -1), rtol=0, atol=1e-12)
    walked = FiberSampler(model, "classification", **SETTINGS).fit([(x, y)])
    pred = walked.predict(x, n_samples=4)
    assert pred.mean.shape == (B, T, C) and pred.sample(4).shape == (4, B, T, C)
    probs = walked(x, n_samples=4)  # the mixture over the samples, per position
    assert probs.shape == (B, T, C)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, T, dtype=DTYPE))


def test_regression_with_positions():
    model = _model()
    x, _ = _data()
    with torch.no_grad():
        y = model(x) + 0.1 * torch.randn(B, T, C, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    fs = FiberSampler(model, "regression", **SETTINGS).fit([(x, y)])
    expected_noise = (y - model(x)).pow(2).mean().sqrt()
    torch.testing.assert_close(fs.sigma_noise, expected_noise.detach())
    mean, cov = fs(x, n_samples=4)
    assert mean.shape == (B, T, C) and cov.shape == (B, T, C, C)
    assert torch.isfinite(cov).all()


def test_bad_position_targets_are_refused():
    model = _model()
    x, y = _data()
    with pytest.raises(ValueError, match="ignore index"):
        FiberSampler(model, "classification", **SETTINGS).fit([(x, torch.full_like(y, -100))])
    with pytest.raises(ValueError, match=r"targets must be"):
        FiberSampler(model, "classification", **SETTINGS).fit([(x, y[:, :2])])


def test_another_ignore_index_gives_the_same_walk_as_minus_100():
    """ignore_index=255 (a segmentation "void" label) skips those positions exactly as -100 does."""
    model = _model()
    x, y = _data()
    void = torch.where(y == -100, 255, y)
    a = FiberSampler(model, "classification", **SETTINGS).fit([(x, y)])
    b = FiberSampler(model, "classification", ignore_index=255, **SETTINGS).fit([(x, void)])
    torch.testing.assert_close(a.particles, b.particles, rtol=0, atol=0)
    assert a.map_nll == b.map_nll
    with pytest.raises(ValueError, match=r"\[0, 2\] or be the ignore index -100"):
        FiberSampler(model, "classification", **SETTINGS).fit([(x, void)])  # 255 without ignore_index=255
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        FiberSampler(model, "classification", ignore_index=-100.0, **SETTINGS)
