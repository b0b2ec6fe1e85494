"""Null-space projection and minimum-norm steps against dense float64 references."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from references import DTYPE, small_cnn, small_mlp

from posthoc.fiber import projection
from posthoc.fiber.projection import batched_cg, min_norm_step, project_null
from posthoc.network.subset import ParameterSubset


@pytest.fixture(params=["dense", "jvp"])
def route(request, monkeypatch) -> str:
    """Both routes of the Jacobian products: dense J_k (these problems are small) and JVP / VJP calls."""
    if request.param == "jvp":
        monkeypatch.setattr(projection, "DENSE_JACOBIAN_NUMEL", 0)
    return request.param


def _dense_jacobian(subset: ParameterSubset, inputs: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """(B*C, P) by autograd.functional.jacobian at an arbitrary theta."""
    jac = torch.autograd.functional.jacobian(lambda th: subset.forward(inputs, th), theta)
    return jac.reshape(-1, theta.numel())


def _thetas(subset: ParameterSubset) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.stack([subset.theta_map,
                        subset.theta_map + 0.3 * torch.randn(subset.n_params, generator=generator, dtype=DTYPE)])


def test_projection_matches_dense_null_space_projector(route):
    torch.set_num_threads(1)
    for model, inputs in ((small_mlp(), torch.randn(4, 3, dtype=DTYPE)),
                          (small_cnn(), torch.randn(2, 1, 6, 6, dtype=DTYPE))):
        subset = ParameterSubset(model, "all")
        thetas = _thetas(subset)
        v = torch.randn(thetas.shape, dtype=DTYPE)
        n_out = subset.forward(inputs).numel()
        # CG on an SPD system of dimension B*C converges in at most B*C steps in exact arithmetic
        projected = project_null(subset, inputs, thetas, v, cg_steps=3 * n_out, damping=0.0)
        for k in range(2):
            jac = _dense_jacobian(subset, inputs, thetas[k])
            expected = v[k] - torch.linalg.pinv(jac) @ (jac @ v[k])
            torch.testing.assert_close(projected[k], expected, rtol=1e-7, atol=1e-9)
            assert float((jac @ projected[k]).abs().max()) < 1e-8  # keeps the batch outputs to first order
        twice = project_null(subset, inputs, thetas, projected, cg_steps=3 * n_out, damping=0.0)
        torch.testing.assert_close(twice, projected, rtol=1e-7, atol=1e-9)  # idempotent


def test_min_norm_step_is_the_pseudoinverse_solution(route):
    torch.set_num_threads(1)
    subset = ParameterSubset(small_mlp(), "last_layer")
    inputs = subset.inputs(torch.randn(3, 3, dtype=DTYPE))
    thetas = _thetas(subset)
    change = torch.randn(2, 3, 3, dtype=DTYPE)
    step = min_norm_step(subset, inputs, thetas, change, cg_steps=30, damping=0.0)
    for k in range(2):
        jac = _dense_jacobian(subset, inputs, thetas[k])
        torch.testing.assert_close(step[k], torch.linalg.pinv(jac) @ change[k].reshape(-1), rtol=1e-7, atol=1e-9)


def test_batched_cg_solves_each_system_with_its_own_steps():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 5, generator=generator, dtype=DTYPE)
    spd = a @ a.transpose(1, 2) + torch.diag_embed(torch.tensor([0.1, 1.0, 10.0], dtype=DTYPE)[:, None].expand(3, 5))
    rhs = torch.randn(3, 5, generator=generator, dtype=DTYPE)
    rhs[1] = 0.0  # a zero right-hand side stays at zero (no division by zero)
    x = batched_cg(lambda u: torch.einsum("kij,kj->ki", spd, u), rhs, steps=10, damping=0.5)
    expected = torch.linalg.solve(spd + 0.5 * torch.eye(5, dtype=DTYPE), rhs)
    torch.testing.assert_close(x, expected, rtol=1e-8, atol=1e-10)


def _two_cg_steps() -> tuple[ParameterSubset, int, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    """An MLP at two particles; the projection and the minimum-norm step after 2 CG steps (far from converged)."""
    torch.set_num_threads(1)
    subset = ParameterSubset(small_mlp(), "all")
    inputs = torch.randn(5, 3, dtype=DTYPE)
    thetas = _thetas(subset)
    v = torch.randn(thetas.shape, dtype=DTYPE)
    change = torch.randn(2, *subset.forward(inputs).shape, dtype=DTYPE)
    return subset, change[0].numel(), lambda: (project_null(subset, inputs, thetas, v, 2, 1e-3),
                                               min_norm_step(subset, inputs, thetas, change, 2, 1e-3))


def test_dense_and_jvp_routes_do_the_same_arithmetic(monkeypatch):
    """The dense route gives the JVP route's CG iterates to round-off."""
    subset, rows, steps = _two_cg_steps()
    assert projection.dense_chunk(rows, subset.n_params) is not None
    dense = steps()
    monkeypatch.setattr(projection, "DENSE_JACOBIAN_NUMEL", 0)
    assert projection.dense_chunk(rows, subset.n_params) is None
    for a, b in zip(dense, steps(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_particles_in_chunks_give_the_same_steps(monkeypatch):
    """A budget of one particle's Jacobian: the particles go one at a time, with the same results."""
    subset, rows, steps = _two_cg_steps()
    together = steps()
    monkeypatch.setattr(projection, "DENSE_JACOBIAN_NUMEL", rows * subset.n_params)
    assert projection.dense_chunk(rows, subset.n_params) == 1
    for a, b in zip(together, steps(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
