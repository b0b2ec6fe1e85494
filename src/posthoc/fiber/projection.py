"""Products with the output Jacobian at many parameter vectors, and the null-space projection.

For K particles thetas (K, P) and a batch of inputs, J_k = d f(X; theta)/d theta at theta_k is a
(B*C, P) matrix that is never stored: every function here uses forward-mode (JVP) and
reverse-mode (VJP) products through ``ParameterSubset.forward``, vectorised over the K particles
with ``torch.func.vmap`` (or looped over them, ``vectorise=False``: :mod:`posthoc.fiber.particles`). One Gram
product J J^T w costs one VJP and one JVP (about three forward passes) per particle. Attention runs on kernels
with forward-mode derivatives and batching rules (:func:`~posthoc.fiber.particles.map_particles`: Hugging Face's
default "sdpa" attention on SDPA's math kernel).

Outputs with positions, (B, ..., C) (:mod:`posthoc.network.positions`): J has one row per output of every
position, B*L*C rows for L positions. ``kept`` (B, ...) selects the positions whose outputs count (targets not
the ignore index): the other positions' rows are dropped, i.e. J v and the cotangents of J^T are zero there, so
the projection keeps the kept positions' outputs only and an ignored position constrains nothing.

The projection onto the directions that keep the batch outputs is

    P v = v - J^T (J J^T + damping I)^-1 J v,

with the (B*C)-dimensional solve done by a fixed number of conjugate-gradient steps (batched
over particles, each particle with its own step lengths). With enough steps and a small damping
P is the orthogonal projection onto null(J); with few steps it is an approximation whose
leftover output change the walk's pull-back removes.

Small problems (rows x P up to :data:`DENSE_JACOBIAN_PER_PARTICLE`, e.g. an MLP on a small UCI set with the loss
check on all training points) hold J_k densely for one projection or step (:func:`~posthoc.curvature.jacobians.
per_example_jacobians`, particles in chunks that fit) and run the same CG with matrix products: the same arithmetic
up to round-off, without the per-call cost of 2 (cg_steps + 1) vmapped JVP / VJP calls that dominates on tiny
networks (a UCI fiber fit: 90 s -> 19 s on yacht). Above that size, building J costs more than it saves.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import jvp, vjp

from posthoc.curvature.jacobians import per_example_jacobians
from posthoc.fiber.particles import map_particles
from posthoc.network.inputs import ModelInputs, batch_size
from posthoc.network.subset import ParameterSubset

# The most Jacobian entries (particles x rows x P) held at once (about 270 MB in float64): particles go in chunks
# that fit; a single particle's J above it goes through JVPs and VJPs.
DENSE_JACOBIAN_NUMEL = 2**25
# The dense route only pays while the per-call cost of JVP / VJP dominates: one particle's J (rows x P entries)
# above this goes through JVPs and VJPs. UCI fiber fits on one CPU thread, dense / matrix-free time: bostonHousing
# (3.4e5 entries) 0.70, wine-quality-red (9.4e5) 1.16, kin8nm (3.7e6) 1.55.
DENSE_JACOBIAN_PER_PARTICLE = 2**19


def _keep(values: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """``values`` (K, B, ..., C) with the positions outside ``kept`` (B, ...) zeroed (None: all kept)."""
    return values if kept is None else values * kept.unsqueeze(-1).to(values.dtype)


def outputs_many(subset: ParameterSubset, inputs: ModelInputs, thetas: torch.Tensor, vectorise: bool = True,
                 randomness: str = "error") -> torch.Tensor:
    """f(X; theta_k) for K particles: (K, B, ..., C). Cost: K forward passes (vmapped unless ``vectorise`` is False)."""
    return map_particles(lambda th: subset.forward(inputs, th), (thetas,), vectorise, randomness)


def jvp_at(subset: ParameterSubset, inputs: ModelInputs, thetas: torch.Tensor, directions: torch.Tensor,
           kept: torch.Tensor | None = None, vectorise: bool = True) -> torch.Tensor:
    """J(theta_k) v_k for K particles and K directions (K, P): (K, B, ..., C), zero outside ``kept``. One JVP each.

    Raises:
        NotImplementedError: an operation of the model has no forward-mode derivative, naming the fix.
    """

    def one(th: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return jvp(lambda t: subset.forward(inputs, t), (th,), (v,))[1]

    try:
        return _keep(map_particles(one, (thetas, directions), vectorise), kept)
    except NotImplementedError as err:
        if "forward AD" not in str(err):
            raise
        raise NotImplementedError(f"the model uses an operation without a forward-mode derivative in this PyTorch "
                                  f"({err}); the fiber walk's projection needs JVPs: replace that operation (e.g. "
                                  "by plain tensor ops)") from err


def vjp_at(subset: ParameterSubset, inputs: ModelInputs, thetas: torch.Tensor, cotangents: torch.Tensor,
           kept: torch.Tensor | None = None, vectorise: bool = True) -> torch.Tensor:
    """J(theta_k)^T u_k for K particles and cotangents (K, B, ..., C), zeroed outside ``kept``: (K, P). One VJP each."""

    def one(th: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return vjp(lambda t: subset.forward(inputs, t), th)[1](u)[0]

    return map_particles(one, (thetas, _keep(cotangents, kept)), vectorise)


def gram_product(subset: ParameterSubset, inputs: ModelInputs, thetas: torch.Tensor, w: torch.Tensor,
                 kept: torch.Tensor | None = None, vectorise: bool = True) -> torch.Tensor:
    """J_k J_k^T w_k for K particles, J_k's rows those of the ``kept`` positions: (K, B, ..., C) -> (K, B, ..., C).

    One VJP and one JVP per particle.
    """
    return jvp_at(subset, inputs, thetas, vjp_at(subset, inputs, thetas, w, kept, vectorise), kept, vectorise)


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


def dense_chunk(rows: int, n_params: int) -> int | None:
    """Particles per chunk of dense Jacobians (rows x P each) within DENSE_JACOBIAN_NUMEL.

    None (the matrix-free route) when one particle's J exceeds that or DENSE_JACOBIAN_PER_PARTICLE.
    """
    per_particle = rows * n_params
    if per_particle > min(DENSE_JACOBIAN_NUMEL, DENSE_JACOBIAN_PER_PARTICLE):
        return None
    return max(1, DENSE_JACOBIAN_NUMEL // per_particle)


def dense_jacobians(subset: ParameterSubset, inputs: ModelInputs, thetas: torch.Tensor, outputs: torch.Size,
                    kept: torch.Tensor | None = None, vectorise: bool = True) -> torch.Tensor:
    """J_k (K, rows, P) of f(X) (shape ``outputs``, (B, ..., C)) at K particles, the rows outside ``kept`` zeroed.

    Cost: per-example Jacobians (C backward passes per example, vmapped over the examples) at the K particles, one
    vmapped call (a loop of K calls when ``vectorise`` is False, :func:`~posthoc.fiber.particles.map_particles`);
    memory K x rows x P.
    """
    subset.vmap_examples(inputs)  # decided (one probe) outside the vmap over particles
    jac = map_particles(lambda theta: per_example_jacobians(subset, inputs, theta), (thetas,), vectorise)
    jac = jac.reshape(thetas.shape[0], *outputs, -1)  # (K, B, ..., C, P)
    if kept is not None:
        jac = jac * kept.unsqueeze(-1).unsqueeze(-1).to(jac.dtype)
    return jac.reshape(thetas.shape[0], outputs.numel(), -1)


def _transposed_product(jac: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """J_k^T u_k (K, P) for dense J (K, rows, P) and u (K, ...) with rows entries.

    Computed as u^T J, reading J in its layout (a product with J's transposed view copies it first).
    """
    return (u.reshape(u.shape[0], 1, -1) @ jac).squeeze(1)


def _dense_gram(jac: torch.Tensor, shape: torch.Size) -> Callable[[torch.Tensor], torch.Tensor]:
    """U (K, B, ..., C) -> J_k J_k^T u_k for dense J (K, rows, P)."""
    def product(u: torch.Tensor) -> torch.Tensor:
        return (jac @ _transposed_product(jac, u).unsqueeze(-1)).reshape(shape)
    return product


def project_null(subset: ParameterSubset, inputs: ModelInputs, thetas: torch.Tensor, v: torch.Tensor,
                 cg_steps: int, damping: float, kept: torch.Tensor | None = None,
                 vectorise: bool = True) -> torch.Tensor:
    """P_k v_k = v_k - J_k^T (J_k J_k^T + damping I)^-1 J_k v_k for K particles: (K, P).

    J_k has the rows of the ``kept`` positions (B, ...) only (None: every output). Cost: ``cg_steps + 1`` Gram
    products plus one JVP and one VJP per particle; memory O(K (P + B L C)) (small problems: the dense J_k, see the
    module docstring).
    """
    chunk = None
    if dense_chunk(batch_size(inputs), thetas.shape[1]) is not None:  # else even one output per example is too many
        with torch.no_grad():  # the number of rows: one forward pass, only where the dense route may apply
            outputs = subset.forward(inputs, thetas[0]).shape
        chunk = dense_chunk(outputs.numel(), thetas.shape[1])
    if chunk is not None:  # the same CG on dense J_k, a chunk of particles at a time (their systems are independent)
        parts = []
        for th, vv in zip(thetas.split(chunk), v.split(chunk), strict=True):
            jac = dense_jacobians(subset, inputs, th, outputs, kept, vectorise)
            jv = (jac @ vv.unsqueeze(-1)).squeeze(-1)
            w = batched_cg(_dense_gram(jac, jv.shape), jv, cg_steps, damping)
            parts.append(vv - _transposed_product(jac, w))
        return torch.cat(parts)
    jv = jvp_at(subset, inputs, thetas, v, kept, vectorise)
    w = batched_cg(lambda u: gram_product(subset, inputs, thetas, u, kept, vectorise), jv, cg_steps, damping)
    return v - vjp_at(subset, inputs, thetas, w, kept, vectorise)


def min_norm_step(subset: ParameterSubset, inputs: ModelInputs, thetas: torch.Tensor, output_change: torch.Tensor,
                  cg_steps: int, damping: float, kept: torch.Tensor | None = None,
                  vectorise: bool = True) -> torch.Tensor:
    """The smallest parameter change (K, P) that moves the linearised outputs by ``output_change`` (K, B, ..., C).

    J_k^T (J_k J_k^T + damping I)^-1 d_k: a Gauss-Newton step of 1/2 ||f(theta) - target||^2 when
    d = target - f(theta), over the ``kept`` positions (B, ...) only (None: every output; the change asked at the
    others is ignored). Cost: ``cg_steps`` Gram products and one VJP per particle (small problems: the dense J_k).
    """
    change = _keep(output_change, kept)
    chunk = dense_chunk(change[0].numel(), thetas.shape[1])
    if chunk is not None:  # the same CG on dense J_k, a chunk of particles at a time
        parts = []
        for th, d in zip(thetas.split(chunk), change.split(chunk), strict=True):
            jac = dense_jacobians(subset, inputs, th, d.shape[1:], kept, vectorise)
            parts.append(_transposed_product(jac, batched_cg(_dense_gram(jac, d.shape), d, cg_steps, damping)))
        return torch.cat(parts)
    w = batched_cg(lambda u: gram_product(subset, inputs, thetas, u, kept, vectorise), change, cg_steps, damping)
    return vjp_at(subset, inputs, thetas, w, kept, vectorise)
