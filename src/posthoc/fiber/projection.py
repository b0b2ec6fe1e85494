"""Products with the output Jacobian at many parameter vectors, and the null-space projection.

For K particles thetas (K, P) and a batch of inputs, J_k = d f(X; theta)/d theta at theta_k is a
(B*C, P) matrix that is never stored: every function here uses forward-mode (JVP) and
reverse-mode (VJP) products through ``ParameterSubset.forward``, vectorised over the K particles
with ``torch.func.vmap``. One Gram product J J^T w costs one VJP and one JVP (about three forward
passes) per particle.

The projection onto the directions that keep the batch outputs is

    P v = v - J^T (J J^T + damping I)^-1 J v,

with the (B*C)-dimensional solve done by a fixed number of conjugate-gradient steps (batched
over particles, each particle with its own step lengths). With enough steps and a small damping
P is the orthogonal projection onto null(J); with few steps it is an approximation whose
leftover output change the walk's pull-back removes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import jvp, vjp, vmap

from posthoc.network.inputs import ModelInputs
from posthoc.network.subset import ParameterSubset


def outputs_many(subset: ParameterSubset, inputs: ModelInputs, thetas: torch.Tensor) -> torch.Tensor:
    """f(X; theta_k) for K particles: (K, B, C). Cost: K forward passes (vmapped)."""
    return vmap(lambda th: subset.forward(inputs, th))(thetas)


def jvp_at(subset: ParameterSubset, inputs: ModelInputs, thetas: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """J(theta_k) v_k for K particles and K directions (K, P): (K, B, C). One JVP per particle."""

    def one(th: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return jvp(lambda t: subset.forward(inputs, t), (th,), (v,))[1]

    return vmap(one)(thetas, directions)


def vjp_at(subset: ParameterSubset, inputs: ModelInputs, thetas: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """J(theta_k)^T u_k for K particles and cotangents (K, B, C): (K, P). One VJP per particle."""

    def one(th: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return vjp(lambda t: subset.forward(inputs, t), th)[1](u)[0]

    return vmap(one)(thetas, cotangents)


def gram_product(subset: ParameterSubset, inputs: ModelInputs, thetas: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """J_k J_k^T w_k for K particles: (K, B, C) -> (K, B, C). One VJP and one JVP per particle."""
    return jvp_at(subset, inputs, thetas, vjp_at(subset, inputs, thetas, w))


def batched_cg(matvec: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, steps: int,
               damping: float) -> torch.Tensor:
    """Solve (A_k + damping I) x_k = b_k for K independent SPD systems by ``steps`` CG iterations.

    ``rhs`` is (K, ...) and ``matvec`` maps a (K, ...) tensor to A_k applied to each slice. Starts at
    x = 0 (so the first iterate is the steepest-descent step); every system has its own step lengths,
    and a system whose residual has reached zero stays put. Cost: ``steps`` calls of ``matvec``.
    """
    dims = tuple(range(1, rhs.ndim))
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(dims, keepdim=True)
    tiny = torch.finfo(rhs.dtype).tiny
    for _ in range(steps):
        ap = matvec(p) + damping * p
        curvature = (p * ap).sum(dims, keepdim=True)
        alpha = torch.where(curvature > tiny, rs / curvature.clamp_min(tiny), torch.zeros_like(rs))
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum(dims, keepdim=True)
        beta = torch.where(rs > tiny, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
        p = r + beta * p
        rs = rs_new
    return x


def project_null(subset: ParameterSubset, inputs: ModelInputs, thetas: torch.Tensor, v: torch.Tensor,
                 cg_steps: int, damping: float) -> torch.Tensor:
    """P_k v_k = v_k - J_k^T (J_k J_k^T + damping I)^-1 J_k v_k for K particles: (K, P).

    Cost: ``cg_steps + 1`` Gram products plus one JVP and one VJP per particle; memory O(K (P + B C)).
    """
    jv = jvp_at(subset, inputs, thetas, v)
    w = batched_cg(lambda u: gram_product(subset, inputs, thetas, u), jv, cg_steps, damping)
    return v - vjp_at(subset, inputs, thetas, w)


def min_norm_step(subset: ParameterSubset, inputs: ModelInputs, thetas: torch.Tensor, output_change: torch.Tensor,
                  cg_steps: int, damping: float) -> torch.Tensor:
    """The smallest parameter change (K, P) that moves the linearised outputs by ``output_change`` (K, B, C).

    J_k^T (J_k J_k^T + damping I)^-1 d_k: a Gauss-Newton step of 1/2 ||f(theta) - target||^2 when
    d = target - f(theta). Cost: ``cg_steps`` Gram products and one VJP per particle.
    """
    w = batched_cg(lambda u: gram_product(subset, inputs, thetas, u), output_change, cg_steps, damping)
    return vjp_at(subset, inputs, thetas, w)
