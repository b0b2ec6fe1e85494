"""The ScaLLA objectives as pure functions: exact expectations over all Rademacher vectors (tiny P)."""

import itertools
import math

import torch

from posthoc.scalla import objectives

DTYPE = torch.float64


def _all_rademacher(p):
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=p)), dtype=DTYPE)


def test_probe_loss_is_unbiased_for_the_ntk_loss_up_to_a_constant():
    # Averaged over all 2^P sign vectors the probe loss equals mean((J J^T - Q)^2) plus a term free of phi,
    # so the gradients in phi agree exactly (the paper's unbiasedness claim), to round-off.
    torch.manual_seed(0)
    n, c, p, m = 3, 2, 6, 4
    jac = torch.randn(n, c, p, dtype=DTYPE)
    feats = torch.randn(n, m, c, dtype=DTYPE, requires_grad=True)
    probes = _all_rademacher(p)
    jvps = torch.einsum("ncp,sp->snc", jac, probes)
    mean_loss = torch.stack([objectives.probe_kernel_loss(feats, jvps[s:s + 1]) for s in range(len(probes))]).mean()
    (g_probe,) = torch.autograd.grad(mean_loss, feats)
    ntk = jac.reshape(n * c, p) @ jac.reshape(n * c, p).T
    phi = feats.permute(1, 0, 2).reshape(m, n * c)
    (g_exact,) = torch.autograd.grad((ntk - phi.T @ phi).square().mean(), feats)
    torch.testing.assert_close(g_probe, g_exact, rtol=1e-10, atol=1e-12)
    # several probes in one step are the average of their targets: the same expectation
    multi = objectives.probe_kernel_loss(feats, jvps)
    (g_multi,) = torch.autograd.grad(multi, feats)
    torch.testing.assert_close(g_multi, g_exact, rtol=1e-10, atol=1e-12)


def test_biased_probe_loss_targets_zero_cross_blocks():
    torch.manual_seed(1)
    n, c, m = 4, 3, 5
    feats = torch.randn(n, m, c, dtype=DTYPE)
    jvps = torch.randn(2, n, c, dtype=DTYPE)
    is_ctx = torch.tensor([False, False, True, True])
    loss = objectives.probe_kernel_loss(feats, jvps, is_ctx, biased=True)
    u = jvps.reshape(2, n * c)
    k = (u.T @ u / 2).reshape(n, c, n, c)
    k[:2, :, 2:] = 0
    k[2:, :, :2] = 0
    phi = feats.permute(1, 0, 2).reshape(m, n * c)
    expected = (k.reshape(n * c, n * c) - phi.T @ phi).square().mean()
    torch.testing.assert_close(loss, expected)


def test_direction_targets_reproduce_the_kernel_of_their_directions():
    torch.manual_seed(2)
    n, c, p, h = 5, 3, 7, 4
    jac = torch.randn(n, c, p, dtype=DTYPE)
    v = torch.randint(0, 2, (h, p)).to(DTYPE) * 2 - 1
    jvps = torch.einsum("ncp,hp->hnc", jac, v)
    t = objectives.direction_targets(jvps, normalise=True)
    k = objectives.surrogate_kernel(t, t)  # (n, n, c, c)
    expected = torch.einsum("icp,hp,hq,jdq->ijcd", jac, v, v, jac) / h
    torch.testing.assert_close(k, expected)
    # biased: 2 training points along the m = 4 directions V, 3 context points along h = 2 other directions W
    w = torch.randint(0, 2, (2, p)).to(DTYPE) * 2 - 1
    tb = objectives.biased_direction_targets(jvps[:, :2], torch.einsum("ncp,hp->hnc", jac[2:], w), normalise_train=True)
    kb = objectives.surrogate_kernel(tb, tb)
    assert tb.shape == (n, h + 2, c)
    torch.testing.assert_close(kb[:2, 2:], torch.zeros_like(kb[:2, 2:]))  # train x context exactly 0
    torch.testing.assert_close(kb[:2, :2], expected[:2, :2])  # the training block is the unbiased kernel
    k_ctx = torch.einsum("icp,hp,hq,jdq->ijcd", jac, w, w, jac) / 2
    torch.testing.assert_close(kb[2:, 2:], k_ctx[2:, 2:])


def test_relative_kernel_error_is_zero_for_exact_features_and_one_for_zero():
    torch.manual_seed(3)
    jac = torch.randn(4, 2, 6, dtype=DTYPE)
    exact = jac.permute(0, 2, 1)  # phi = J^T (m = P): Phi^T Phi = J J^T
    assert objectives.relative_kernel_error(exact, jac) < 1e-12
    assert math.isclose(objectives.relative_kernel_error(torch.zeros_like(exact), jac), 1.0)
