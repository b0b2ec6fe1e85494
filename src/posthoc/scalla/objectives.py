"""ScaLLA training objectives as pure functions of tensors (docs/scalla.md).

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


def direction_targets(jvps: torch.Tensor, normalise: bool) -> torch.Tensor:
    """Feature targets (n, m, C) of the deterministic objective from JVPs (m, n, C) along m fixed directions.

    phi_k(x) = J(x) v_k (divided by sqrt(m) when ``normalise``, for Rademacher directions, so that
    Phi^T Phi = J V V^T J^T / m estimates the NTK without bias).
    """
    t = jvps.permute(1, 0, 2)
    return (t / math.sqrt(jvps.shape[0]) if normalise else t).contiguous()


def biased_direction_targets(train_jvps: torch.Tensor, context_jvps: torch.Tensor, normalise_train: bool
                             ) -> torch.Tensor:
    """Feature targets (n_t + n_c, m + h, C) of the biased variant, training points first.

    ``train_jvps`` (m, n_t, C) along the m training directions V, ``context_jvps`` (h, n_c, C) along h Rademacher
    directions W. Training points get [J V / sqrt(m) (or J V, see ``normalise_train``); 0_h], exactly their
    unbiased targets, and context points [0_m; J W / sqrt(h)]. So the train x context kernel is exactly zero
    (the feature form of the paper's masked target), the training block is the unbiased variant's kernel
    (same rank m) and the context block an unbiased rank-h estimate of the NTK among context points.
    """
    m, n_t, c = train_jvps.shape
    h, n_c, c_ctx = context_jvps.shape
    if c != c_ctx:
        raise ValueError(f"training JVPs have {c} outputs but context JVPs {c_ctx}")
    train = direction_targets(train_jvps, normalise_train)
    ctx = direction_targets(context_jvps, True)
    return torch.cat([torch.cat([train, train.new_zeros(n_t, h, c)], dim=1),
                      torch.cat([ctx.new_zeros(n_c, m, c), ctx], dim=1)])


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
