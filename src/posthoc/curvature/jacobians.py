"""Jacobian products of a ParameterSubset's outputs in theta, via torch.func.

J(x) is the (C, P) Jacobian of the covered module's outputs in theta at the MAP.
"""

from __future__ import annotations

import torch
from torch.func import jacrev, jvp, vjp, vmap

from posthoc.laplace.subset import ParameterSubset


def per_example_jacobians(subset: ParameterSubset, inputs: torch.Tensor, theta: torch.Tensor | None = None,
                          chunk_size: int | None = None) -> torch.Tensor:
    """J for each input: (B, C, P). Memory B*C*P: use for small P or small batches.

    Computed as a vmap over examples of reverse-mode jacrev (C backward passes each).
    """
    theta = subset.theta_map if theta is None else theta

    def single(x: torch.Tensor) -> torch.Tensor:
        return jacrev(lambda th: subset.forward(x.unsqueeze(0), th).squeeze(0))(theta)

    return vmap(single, chunk_size=chunk_size)(inputs)


def jvp_many(subset: ParameterSubset, inputs: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """J(x) V for K directions V (K, P): returns (K, B, C). Cost: K forward-mode passes (vmapped)."""

    def one(v: torch.Tensor) -> torch.Tensor:
        return jvp(lambda th: subset.forward(inputs, th), (subset.theta_map,), (v,))[1]

    return vmap(one)(directions)


def vjp_sum(subset: ParameterSubset, inputs: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """sum_n J(x_n)^T u_n for cotangents U (B, C): returns (P,). Cost: one backward pass."""
    _, pullback = vjp(lambda th: subset.forward(inputs, th), subset.theta_map)
    return pullback(cotangents)[0]


def per_example_factor_gradients(subset: ParameterSubset, inputs: torch.Tensor, factors: torch.Tensor,
                                 chunk_size: int | None = None) -> torch.Tensor:
    """J_n^T S_n for every example: (B, K, P) from factors S (B, C, K).

    A vmap over examples and the K columns of S of one VJP each; memory B*K*P.
    """

    def single(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        _, pullback = vjp(lambda th: subset.forward(x.unsqueeze(0), th).squeeze(0), subset.theta_map)
        return vmap(lambda col: pullback(col)[0])(s.T)

    return vmap(single, chunk_size=chunk_size)(inputs, factors)
