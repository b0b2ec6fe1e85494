"""ScaLLA training objectives as pure functions of tensors (METHODS.md §3).

Each takes the surrogate's features of a batch, the JVPs of the network on the same batch and,
for the biased variant, which points are context points; none of them touches a model. A
distributed wrapper can all-gather features, JVPs and group masks across ranks around them.

Shapes: features Phi (n, m, C) with n points, m latent features, C outputs; JVPs U (S, n, C)
for S directions (u_s = J(X) v_s).
"""

from __future__ import annotations

import math

import torch


def _flat_features(features: torch.Tensor) -> torch.Tensor:
    """(n, m, C) -> (m, n C): column (i, a) is phi_{:, a}(x_i)."""
    n, m, c = features.shape
    return features.permute(1, 0, 2).reshape(m, n * c)


def same_group_mask(is_context: torch.Tensor, n_outputs: int) -> torch.Tensor:
    """(n C, n C) 0/1 mask: 1 where both points are training points or both are context points."""
    same = (is_context[:, None] == is_context[None, :]).to(torch.get_default_dtype())
    return same.repeat_interleave(n_outputs, 0).repeat_interleave(n_outputs, 1)


def probe_kernel_loss(features: torch.Tensor, jvps: torch.Tensor, is_context: torch.Tensor | None = None,
                      biased: bool = False) -> torch.Tensor:
    """The paper's objective: mean over i, j, a, b of (K - Q)^2.

    K = (1/S) sum_s u_s u_s^T is the NTK estimate of S Rademacher probes (unbiased for J(X) J(X)^T, its
    variance falls as 1/S); Q = Phi^T Phi the surrogate kernel. ``biased`` zeroes the train x context
    blocks of K (``is_context`` (n,) bool says which points are context). Cost O((nC)^2 (S + m)).
    """
    n, m, c = features.shape
    phi = _flat_features(features)
    u = jvps.reshape(jvps.shape[0], n * c).to(phi.dtype)
    target = u.T @ u / jvps.shape[0]
    if biased:
        if is_context is None:
            raise ValueError("the biased objective needs is_context (which points are context points)")
        target = target * same_group_mask(is_context, c).to(target)
    return (target - phi.T @ phi).square().mean()


def direction_targets(jvps: torch.Tensor, normalise: bool, is_context: torch.Tensor | None = None,
                      biased: bool = False, n_context_features: int = 0) -> torch.Tensor:
    """Feature targets (n, m, C) of the deterministic objective from JVPs (m, n, C) along m fixed directions.

    Unbiased: phi_k(x) = J(x) v_k (divided by sqrt(m) when ``normalise``, for Rademacher directions, so that
    Phi^T Phi = J V V^T J^T / m estimates the NTK). Biased, with h = ``n_context_features``: training points get
    [J V_{:m-h} / sqrt(m - h); 0] and context points [0; J V_{:h} / sqrt(h)], so the train x context kernel is
    exactly zero and each group keeps an unbiased NTK estimate (rank m - h and h), the feature form of the
    paper's masked target.
    """
    m = jvps.shape[0]
    t = jvps.permute(1, 0, 2)
    if not biased:
        return (t / math.sqrt(m) if normalise else t).contiguous()
    if is_context is None:
        raise ValueError("biased targets need is_context (which points are context points)")
    h = n_context_features
    if not 1 <= h < m:
        raise ValueError(f"biased targets need 1 <= n_context_features < m = {m}, got {h}")
    train_part, ctx_part = t[:, : m - h], t[:, :h]
    if normalise:
        train_part, ctx_part = train_part / math.sqrt(m - h), ctx_part / math.sqrt(h)
    ctx = is_context.reshape(-1, 1, 1)
    return torch.cat([torch.where(ctx, torch.zeros_like(train_part), train_part),
                      torch.where(ctx, ctx_part, torch.zeros_like(ctx_part))], dim=1)


def direction_regression_loss(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error between features and their targets, both (n, m, C): plain supervised regression."""
    if features.shape != targets.shape:
        raise ValueError(f"features {tuple(features.shape)} and targets {tuple(targets.shape)} differ in shape")
    return (features - targets.to(features.dtype)).square().mean()


def surrogate_kernel(features_1: torch.Tensor, features_2: torch.Tensor) -> torch.Tensor:
    """k(x1_i, x2_j)_{ab} = sum_k phi_ka(x1_i) phi_kb(x2_j): (B1, B2, C, C) from (B1, m, C), (B2, m, C)."""
    return torch.einsum("ika,jkb->ijab", features_1, features_2)


def relative_kernel_error(features: torch.Tensor, jacobians: torch.Tensor) -> float:
    """||J J^T - Phi^T Phi||_F / ||J J^T||_F over the (nC x nC) Gram of n points; jacobians (n, C, P)."""
    j = jacobians.reshape(-1, jacobians.shape[-1])
    ntk = j @ j.T
    phi = _flat_features(features).to(ntk.dtype)
    return float(torch.linalg.matrix_norm(ntk - phi.T @ phi) / torch.linalg.matrix_norm(ntk))
