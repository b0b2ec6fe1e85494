"""Rules for the affine layers, Linear and Conv2d: exact moments of W a + b.

For Gaussian a independent of the random (W, b), with the weight noise of a diagonal, Kronecker-factored or full
layer posterior.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from posthoc.curvature.layers import conv_padding, conv_support_problem
from posthoc.streamlined.moments import Moments
from posthoc.streamlined.rules.base import Context, Step, UnsupportedLayerError, advance, register_rule
from posthoc.streamlined.rules.weight_cache import IdentityMap, cached_on
from posthoc.streamlined.weight_posteriors import LayerPosterior
from posthoc.utils.conv import unfold_patches

# Largest C² · 2K (entries) of the matrix behind LinearStep._fused_cov: 16 MB in float32.
FUSED_COV_MAX = 1 << 22


class AffineNoise:
    """Weight-noise moments of h_l = W a_l + b at L positions, inputs as patches (B, L, K).

    Diagonal mode splits Var(h) into the part ``shared(μ)`` = Var(δW μ + δb), bilinear in the
    input mean (shared by all positions that see the same W), and ``from_input(var)``, the
    weight noise times the input variances. ``full(μ, cov | var)`` is the (B, L·C, L·C)
    covariance in (position, channel) order, cross-position terms from the shared W included.
    """

    def __init__(self, post: LayerPosterior, weight: torch.Tensor, bias: torch.Tensor | None,
                 module: nn.Module) -> None:
        self.c_out, self.k = weight.shape[0], weight[0].numel()
        self.bias_present = bias is not None
        self.w_kron = self.full = None
        self.b_var = self.b_cov = None
        if post.full is not None:
            self.full = post.full_blocks(module)
            cww, cwb, cbb = self.full
            if cww is not None:
                self.cww_cc = torch.diagonal(cww, dim1=0, dim2=2).permute(2, 0, 1)  # (C, K, K)
            if cwb is not None:
                self.cwb_cc = torch.diagonal(cwb, dim1=0, dim2=2)  # (K, C)
            if cbb is not None:
                self.b_cov, self.b_var = cbb, torch.diagonal(cbb)
        self.w_var: torch.Tensor | None = post.diag.get("weight")  # the posterior's own tensor (a cache key)
        if self.w_var is None and "weight" in post.kron:
            f = post.kron["weight"]
            if f.q_in is None:
                raise ValueError("a weight's Kronecker factor needs its input basis q_in (this one is a bias's)")
            self.w_kron = (f.q_out, f.q_in, f.inv, f.q_out.square(), f.q_in.square())
        if bias is not None and "bias" in post.diag:
            self.b_var = post.diag["bias"]
        elif bias is not None and "bias" in post.kron:
            self.b_cov = post.kron["bias"].dense_bias_cov()
            self.b_var = post.kron["bias"].q_out.square() @ post.kron["bias"].inv

    @property
    def w_diag(self) -> torch.Tensor | None:
        """Var(W) as (C, K), or None: read from the posterior's own tensor on every access.

        So in-place changes of the variances are seen, also where the reshape is a copy (non-contiguous conv
        variances); elsewhere it is a view.
        """
        return None if self.w_var is None else self.w_var.reshape(self.c_out, self.k)

    def diagonal_weight_var(self) -> torch.Tensor | None:
        """Var(W) (C, K) where the weight and bias noise are diagonal, else None (Kronecker, full or correlated bias).

        Diagonal noise adds Σ_k Var(W_ck)(μ_k² + var_k) + Var(b_c) to the output variances and nothing across outputs.
        """
        return self.w_diag if self.full is None and self.b_cov is None else None

    # ---- diagonal mode
    def shared(self, mu: torch.Tensor) -> torch.Tensor:
        """Var(δW μ + δb) per output, μ (..., K) -> (..., C)."""
        if self.w_diag is not None:
            return F.linear(mu.square(), self.w_diag, self.b_var)
        out = torch.zeros(*mu.shape[:-1], self.c_out, dtype=mu.dtype, device=mu.device)
        if self.w_kron is not None:
            _, q_in, inv, q_out_sq, _ = self.w_kron
            out = out + ((mu @ q_in).square() @ inv.T) @ q_out_sq.T
        elif self.full is not None:
            if self.full[0] is not None:
                out = out + torch.einsum("...k,ckj,...j->...c", mu, self.cww_cc, mu)
            if self.full[1] is not None:
                out = out + 2 * mu @ self.cwb_cc
        return out if self.b_var is None else out + self.b_var

    def from_input(self, var: torch.Tensor) -> torch.Tensor:
        """Σ_k Var(W_ck) var_k in the weight basis, var (..., K) -> (..., C)."""
        if self.w_diag is not None:
            return var @ self.w_diag.T
        if self.w_kron is not None:
            _, _, inv, q_out_sq, q_in_sq = self.w_kron
            return ((var @ q_in_sq) @ inv.T) @ q_out_sq.T
        if self.full is not None and self.full[0] is not None:
            return var @ torch.diagonal(self.cww_cc, dim1=1, dim2=2).T
        return torch.zeros(*var.shape[:-1], self.c_out, dtype=var.dtype, device=var.device)

    # ---- full mode
    def needs_cross_feature_cov(self) -> bool:
        """Whether :meth:`full_cov` reads input covariances between different features.

        True for Kronecker or full weight noise; a diagonal one reads only each feature's covariance across
        positions (``same_feature``).
        """
        return self.w_kron is not None or (self.full is not None and self.full[0] is not None)

    def full_cov(self, mu: torch.Tensor, cov: torch.Tensor | None = None, var: torch.Tensor | None = None,
                 same_feature: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L·C, L·C) weight-noise covariance for input mean μ (B, L, K).

        The input covariance is either ``cov`` (B, L·K, L·K) in (position, feature) order, diagonal ``var``
        (B, L, K), or, where :meth:`needs_cross_feature_cov` is False, only its same-feature part
        ``same_feature`` (B, L, L, K): Cov(a_lk, a_mk).
        """
        if same_feature is not None and self.needs_cross_feature_cov():
            raise ValueError("Kronecker or full weight noise needs the input covariance across features (cov=)")
        b, n_pos, k = mu.shape
        c = self.c_out
        eye_pos = torch.eye(n_pos, dtype=mu.dtype, device=mu.device)
        cov5 = None if cov is None else cov.reshape(b, n_pos, k, n_pos, k)
        noise = mu.new_zeros(b, n_pos, c, n_pos, c)
        if self.w_diag is not None or self.w_kron is not None:
            if self.w_kron is not None:
                q_out, q_in, inv, _, q_in_sq = self.w_kron
                mu_r = mu @ q_in
                m = mu_r.unsqueeze(2) * mu_r.unsqueeze(1)  # (B, L, L, K) rotated second moments, k = k'
                if cov5 is not None:
                    t = torch.einsum("blkmj,jr->blkmr", cov5, q_in)
                    m = m + torch.einsum("blkmr,kr->blmr", t, q_in)
                elif var is not None:
                    m = m + torch.diag_embed((var @ q_in_sq).transpose(1, 2)).permute(0, 2, 3, 1)
                n = m @ inv.T  # (B, L, L, q)
                noise = noise + torch.einsum("blmq,cq,dq->blcmd", n, q_out, q_out)
            elif self.w_diag is not None:
                m = mu.unsqueeze(2) * mu.unsqueeze(1)
                if cov5 is not None:
                    m = m + torch.diagonal(cov5, dim1=2, dim2=4)
                elif same_feature is not None:
                    m = m + same_feature
                elif var is not None:
                    m = m + eye_pos[None, :, :, None] * var.unsqueeze(2)
                n = m @ self.w_diag.T  # (B, L, L, C)
                noise = noise + torch.diag_embed(n).permute(0, 1, 3, 2, 4)
        elif self.full is not None:
            cww, cwb, _ = self.full
            if cww is not None:
                e2 = torch.einsum("blk,bmj->blkmj", mu, mu)
                if cov5 is not None:
                    e2 = e2 + cov5
                elif var is not None:
                    e2 = e2 + torch.diag_embed(var).unsqueeze(3) * eye_pos[None, :, None, :, None]
                noise = noise + torch.einsum("ckdj,blkmj->blcmd", cww, e2)
            if cwb is not None:
                x = torch.einsum("ckd,blk->blcd", cwb, mu)  # Cov(δW_c a_l, δb_d)
                noise = noise + x.unsqueeze(3) + x.permute(0, 3, 1, 2).unsqueeze(1)
        if self.b_cov is not None:
            noise = noise + self.b_cov[None, None, :, None, :]
        elif self.b_var is not None:
            noise = noise + torch.diag(self.b_var)[None, None, :, None, :]
        noise = noise.reshape(b, n_pos * c, n_pos * c)
        return 0.5 * (noise + noise.transpose(1, 2))


# Per layer posterior (a WeightPosterior's entry, replaced when the Laplace changes) and module: its AffineNoise,
# whose views and factors depend on nothing else, built once instead of on every prediction.
_NOISE: IdentityMap[LayerPosterior, IdentityMap[nn.Module, AffineNoise]] = IdentityMap()


def _affine_noise(module: nn.Linear | nn.Conv2d, ctx: Context) -> AffineNoise | None:
    post = ctx.posterior.get(module)
    if post is None or not (post.is_random("weight") or post.is_random("bias")):
        return None
    by_module = _NOISE.get(post)
    if by_module is None:
        by_module = _NOISE.set(post, IdentityMap())
    noise = by_module.get(module)
    if noise is None or noise.bias_present is not (module.bias is not None):
        noise = by_module.set(module, AffineNoise(post, module.weight, module.bias, module))
    return noise


class AffineStep(Step):
    """A Linear or Conv2d step: ``noise`` holds its weight-noise moments, None when its weights are deterministic."""

    noise: AffineNoise | None

    @property
    def has_noise(self) -> bool:
        """Whether the weight or bias is random."""
        return self.noise is not None


class LinearStep(AffineStep):
    """nn.Linear on (B, *lead, K): the lead dims are positions sharing W (tokens)."""

    def __init__(self, module: nn.Linear, state: Moments, ctx: Context) -> None:
        self.module, self.mu = module, state.mean
        self.noise = _affine_noise(module, ctx)
        self.mean = F.linear(state.mean, module.weight, module.bias)

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        """J on directions (B, N, *in_shape) -> (B, N, *out_shape): W̄ applied to each direction."""
        return F.linear(directions, self.module.weight)

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        """Output variances (B, *lead, C) from the input variances and the weight noise; cost O(B L K C)."""
        weight = self.module.weight
        w_sq = cached_on((weight,), "square", weight.square)
        if self.noise is None:
            return None if var_in is None else F.linear(var_in, w_sq)
        if var_in is not None and self.noise.w_diag is not None:
            # Σ_k Var(W_ck) (μ_k² + var_k) + Var(b_c), then += Σ_k W̄_ck² var_k in place: two products, one
            # elementwise op (the per-token cost of a diagonal posterior; see the module docstring)
            out = F.linear(torch.addcmul(var_in, self.mu, self.mu), self.noise.w_diag, self.noise.b_var)
            out.view(-1, out.shape[-1]).addmm_(var_in.reshape(-1, var_in.shape[-1]), w_sq.T)
            return out
        out = self.noise.shared(self.mu)
        if var_in is None:
            return out
        return out + F.linear(var_in, w_sq) + self.noise.from_input(var_in)

    def noise_full(self, cov_in: torch.Tensor | None) -> torch.Tensor | None:
        """The weight noise's output covariance (B, L·C, L·C) given the input covariance, or None without noise."""
        if self.noise is None:
            return None
        b = self.mu.shape[0]
        return self.noise.full_cov(self.mu.reshape(b, -1, self.noise.k), cov=cov_in)

    def factored_output(self, var_in: torch.Tensor | None) -> Moments | None:
        """The output as F Fᵀ + diag(d) (B, C, K) where that is smaller than the (B, C, C) matrix, else None.

        With input units independent, W diag(var) Wᵀ = F Fᵀ for F = W diag(√var) (K inputs, C outputs), and a
        diagonal weight and bias noise adds only d. Used when K < C (e.g. ResNet-18's 512 features, 1,000
        classes): O(B·C·K) where forming the matrix costs O(B·C²·K) and its B·C² entries several passes.
        """
        w, noise = self.module.weight, self.noise
        if var_in is None or w.shape[1] >= w.shape[0]:
            return None
        if noise is None:
            diag = torch.zeros_like(self.mean)
        elif (w_var := noise.diagonal_weight_var()) is not None:
            # Σ_k Var(W_ck)(μ_k² + var_k) + Var(b_c): diagonal weight and bias noise reach only the diagonal
            diag = F.linear(torch.addcmul(var_in, self.mu, self.mu), w_var, noise.b_var)
        else:
            return None  # Kronecker, full or correlated bias noise: cross-output terms beyond the factor
        factor = w * var_in.clamp_min(0).sqrt().unsqueeze(1)  # (B, C, K); round-off may leave -eps variances
        return Moments(self.mean, var=diag, factor=factor)

    def cov_from_var(self, var_in: torch.Tensor | None) -> torch.Tensor:
        """(B, C, C) output covariance for 2-D inputs with independent units (diagonal mode's last layer).

        Symmetric up to round-off (:func:`posthoc.predictive.scale.scaled_gaussian` symmetrises it).
        """
        fused = self._fused_cov(var_in)
        if fused is not None:
            return fused
        w = self.module.weight
        b = self.mu.shape[0]
        # W diag(var) Wᵀ straight into a fresh (B, C, C) (C = 1000: each pass over it costs ~0.02x a ResNet-18 MAP)
        cov = self.mean.new_zeros(b, w.shape[0], w.shape[0]) if var_in is None else (w * var_in.unsqueeze(1)) @ w.T
        noise = self.noise
        if noise is not None and (w_var := noise.diagonal_weight_var()) is not None:
            # diagonal weight and bias noise reach only the diagonal: Σ_k Var(W_ck)(μ_k² + var_k) + Var(b_c), added
            # in place after the symmetrisation instead of a (B, C, C) noise matrix (C = 1000: several passes)
            cov = torch.add(cov, cov.transpose(1, 2)).mul_(0.5)
            second = self.mu.square() if var_in is None else torch.addcmul(var_in, self.mu, self.mu)
            cov.diagonal(dim1=1, dim2=2).add_(F.linear(second, w_var, noise.b_var))
            return cov
        if self.noise is not None:
            cov = cov + self.noise.full_cov(self.mu.unsqueeze(1), var=None if var_in is None else var_in.unsqueeze(1))
        return 0.5 * (cov + cov.transpose(1, 2))

    def _fused_cov(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        """:meth:`cov_from_var` as one product where the output is small, else None.

        Cov(h_c, h_d) = Σ_k W̄_ck W̄_dk v_k + δ_cd (Σ_k Var(W_ck)(μ_k² + v_k) + Var(b_c)) for a diagonal weight and bias
        noise is linear in [v, μ²]: one (B, 2K) x (2K, C²) product with a matrix built once per weight and posterior.
        For few classes (C² · 2K <= FUSED_COV_MAX) the forming, symmetrising and diagonal passes cost more than
        their arithmetic (a 10-class MLP head: a third of the propagation's time on top of the MAP forward).
        """
        w, noise = self.module.weight, self.noise
        c, k = w.shape
        w_var = None if noise is None else noise.diagonal_weight_var()
        if var_in is None or c * c * 2 * k > FUSED_COV_MAX or (noise is not None and w_var is None):
            return None

        def build() -> tuple[torch.Tensor, torch.Tensor | None]:
            outer = (w.unsqueeze(1) * w.unsqueeze(0)).reshape(c * c, k)  # rows (c, d): W̄_c ⊙ W̄_d
            if noise is None or w_var is None:
                return outer, None
            eye = torch.eye(c, dtype=w.dtype, device=w.device)
            on_diagonal = (eye.unsqueeze(2) * w_var.unsqueeze(1)).reshape(c * c, k)  # δ_cd Var(W_c·)
            bias = None if noise.b_var is None else (eye * noise.b_var).reshape(c * c)
            return torch.cat([outer + on_diagonal, on_diagonal], dim=1), bias

        key = (w, None if noise is None else noise.w_var, None if noise is None else noise.b_var)
        matrix, bias = cached_on(key, "fused last-layer covariance", build)
        inputs = var_in if noise is None else torch.cat([var_in, self.mu.square()], dim=1)
        return F.linear(inputs, matrix, bias).view(-1, c, c)


@register_rule(nn.Linear)
def linear_rule(module: nn.Linear, state: Moments, ctx: Context, last: bool) -> Moments:
    """Linear: exact moments of W a + b for Gaussian a independent of (W, b).

    Diagonal mode: σ²_h = W̄² σ²_a + Var(δW μ_a + δb) + Var(δW)·σ²_a (per position); as the
    last layer of a diagonal-mode walk on 2-D inputs the (B, C, C) output covariance is
    returned (input units independent), factored as F Fᵀ + diag(d) where that is smaller (K < C:
    :meth:`LinearStep.factored_output`). Full mode: Σ_h = W̄ Σ_a W̄ᵀ + E[δW (Σ_a + μμᵀ) δWᵀ] + Σ_b.
    """
    step = LinearStep(module, state, ctx)
    if last and not ctx.full and state.mean.ndim == 2 and not state.crosses:
        factored = step.factored_output(state.var)
        return factored if factored is not None else Moments(step.mean, cov=step.cov_from_var(state.var))
    return advance(state, step, ctx)


def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    """The symmetric zero padding of a supported Conv2d (the per-layer routes' one decision, curvature.layers)."""
    problem = conv_support_problem(module)
    padding = conv_padding(module)
    if problem is not None or padding is None:
        raise UnsupportedLayerError(f"Conv2d with {problem} is not supported")
    return padding


class ConvStep(AffineStep):
    """nn.Conv2d: the affine rules on unfolded patches (positions share the kernel)."""

    def __init__(self, module: nn.Conv2d, state: Moments, ctx: Context) -> None:
        self.module, self.mu, self.in_shape = module, state.mean, state.shape
        self.padding = _conv_padding(module)
        self.noise = _affine_noise(module, ctx)
        self.mean = self._conv(state.mean, module.weight, module.bias)
        self.out_shape = tuple(self.mean.shape[1:])

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        m = self.module
        return F.conv2d(x, weight, bias, m.stride, self.padding, m.dilation)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, L, K)."""
        m = self.module
        size, dilation, stride = (cast("tuple[int, int]", v) for v in (m.kernel_size, m.dilation, m.stride))
        return unfold_patches(x, size, dilation, self.padding, stride).transpose(1, 2)

    def _to_image(self, per_position: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (B, C, H', W')."""
        return per_position.transpose(1, 2).reshape(per_position.shape[0], *self.out_shape)

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        """J on directions (B, N, *in_shape) -> (B, N, *out_shape): one convolution with W̄ per direction."""
        b, n = directions.shape[:2]
        out = self._conv(directions.reshape(b * n, *self.in_shape), self.module.weight)
        return out.reshape(b, n, *self.out_shape)

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        """Output variances (B, C, H', W'): convolutions of the variances (diagonal noise) or unfolded patches."""
        weight = self.module.weight
        w_sq = cached_on((weight,), "square", weight.square)
        if self.noise is None:
            return None if var_in is None else self._conv(var_in, w_sq)
        if self.noise.w_diag is not None:  # conv(σ²_a, W̄² + S) + conv(μ², S): two convolutions, no unfolding
            s_w = self.noise.w_diag.reshape(w_sq.shape)
            noise = self._conv(self.mu.square(), s_w, self.noise.b_var)
            if var_in is None:
                return noise
            second = cached_on((weight, self.noise.w_var), "square + variance", lambda: w_sq + s_w)
            # accumulated in place: a fresh output is a fresh allocation (on CPU, page faults on first touch)
            return noise.add_(self._conv(var_in, second))
        noise_p = self.noise.shared(self._patches(self.mu))
        if var_in is not None:
            noise_p = noise_p + self.noise.from_input(self._patches(var_in))
        noise = self._to_image(noise_p)
        return noise if var_in is None else noise + self._conv(var_in, w_sq)

    def _same_feature_cov(self, cov_in: torch.Tensor) -> torch.Tensor:
        """Cov(a_lk, a_mk) (B, L, L, K) of the unfolded patches, from the input covariance (B, D, D), D = C·H·W.

        Patch entry k = (c, i, j) at output position l reads input channel c at l's window offset (i, j), zero in
        the padding, so each offset is a strided slice of the channel-diagonal covariance (B, C, H, W, H, W)
        padded with zeros. Memory O(B C (HW)² + B L² K), where the full patch covariance is O(B (L K)²).
        """
        m = self.module
        b, (c, h, w) = cov_in.shape[0], self.in_shape
        (kh, kw), (dh, dw), (sh, sw) = (cast("tuple[int, int]", v) for v in (m.kernel_size, m.dilation, m.stride))
        ph, pw = self.padding
        h_out, w_out = self.out_shape[1:]
        per_channel = torch.diagonal(cov_in.reshape(b, c, h, w, c, h, w), dim1=1, dim2=4)  # (B, H, W, H, W, C)
        padded = F.pad(per_channel.permute(0, 5, 1, 2, 3, 4), (pw, pw, ph, ph, pw, pw, ph, ph))
        offsets = []
        for i in range(kh):
            rows = slice(i * dh, i * dh + sh * (h_out - 1) + 1, sh)
            for j in range(kw):
                cols = slice(j * dw, j * dw + sw * (w_out - 1) + 1, sw)
                offsets.append(padded[:, :, rows, cols, rows, cols])  # (B, C, H', W', H', W')
        n_pos = h_out * w_out
        same = torch.stack(offsets, 2).reshape(b, c * kh * kw, n_pos, n_pos)  # k in (c, i, j) order, as unfold
        return same.permute(0, 2, 3, 1)

    def noise_full(self, cov_in: torch.Tensor | None) -> torch.Tensor | None:
        """The weight noise's covariance (B, C·L, C·L) in (channel, position) order, or None without noise.

        Cost: with a diagonal weight posterior O(B (C_out L)² + B L² K) (only same-feature input covariances are
        read); with Kronecker or full weight noise O(B (L K)²) for the unfolded patch covariance.
        """
        if self.noise is None:
            return None
        b, d = self.mu.shape[0], self.mu[0].numel()
        mu_p = self._patches(self.mu)
        n_pos, k = mu_p.shape[1:]
        if cov_in is None or not self.noise.needs_cross_feature_cov():
            # diagonal weight noise reads Cov(a_lk, a_mk) only: (B, L, L, K) instead of the (B, L·K, L·K) patches;
            # bias noise reads no input covariance
            same = None if cov_in is None or self.noise.w_diag is None else self._same_feature_cov(cov_in)
            noise = self.noise.full_cov(mu_p, same_feature=same)
        else:
            rows = self._patches(cov_in.reshape(b * d, *self.in_shape)).reshape(b, d, n_pos * k)
            cov_p = self._patches(rows.transpose(1, 2).reshape(b * n_pos * k, *self.in_shape))
            noise = self.noise.full_cov(mu_p, cov=cov_p.reshape(b, n_pos * k, n_pos * k))  # (position, channel)
        c = self.noise.c_out
        return noise.reshape(b, n_pos, c, n_pos, c).permute(0, 2, 1, 4, 3).reshape(b, c * n_pos, c * n_pos)


@register_rule(nn.Conv2d)
def conv2d_rule(module: nn.Conv2d, state: Moments, ctx: Context, last: bool) -> Moments:
    """Conv2d: the Linear rules per output position on unfolded patches.

    Diagonal mode: a diagonal posterior costs two extra convolutions; KFAC/full unfold the patches. Full mode keeps
    the cross-position covariance the shared kernel induces (O((L·K)²) per example).
    """
    return advance(state, ConvStep(module, state, ctx), ctx)
