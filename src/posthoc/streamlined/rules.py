"""Moment-propagation rules, one per layer type, in a registry new layers plug into.

A rule maps (module, input :class:`Moments`, :class:`Context`) to output Moments. Most
rules build a :class:`Step` (the layer linearised at the input mean) and call
:func:`advance`, which applies it in the chosen mode:

- diagonal mode: ``step.var(var_in)``, the output variances (weight noise included);
- full mode: Σ_out = J Σ_in Jᵀ + ``step.noise_full(Σ_in)`` (the weight-noise covariance,
  cross-unit and cross-position terms included), and J applied to every open
  cross-covariance (residual blocks).

Weights are independent of the incoming activations (they belong to different layers),
so for Linear/Conv2d layers the moments are exact given Gaussian inputs; the only
approximations are the linearisation of nonlinear layers at the mean (activations,
LayerNorm, attention weights) and, in diagonal mode, the dropped covariances.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from posthoc.streamlined.moments import (
    ActivationCovariance,
    Moments,
    add_optional,
    apply_to_crosses,
    rearrange,
    sandwich,
)
from posthoc.streamlined.weight_posteriors import LayerPosterior, WeightPosterior
from posthoc.utils.conv import unfold_patches


class AttentionRule(str, Enum):
    """Diagonal-mode variance rule for self-attention (Q, K deterministic, V random)."""

    INDEPENDENT = "independent"  # the authors': Σ_o,t = Σ_s A_ts² Σ_v,s (tokens independent)
    SHARED_VALUE = "shared_value"  # keeps the cross-token covariance of the shared random W_v


class LayerNormRule(str, Enum):
    FROZEN = "frozen"  # the authors': statistics held at their values for the mean input
    LINEARIZED = "linearized"  # the Jacobian of LayerNorm at the mean input


class UnsupportedLayerError(TypeError):
    """A module has no moment-propagation rule."""


@dataclass
class Context:
    mode: ActivationCovariance
    posterior: WeightPosterior
    attention: AttentionRule = AttentionRule.INDEPENDENT
    layernorm: LayerNormRule = LayerNormRule.FROZEN
    max_full_dim: int = 4096

    @property
    def full(self) -> bool:
        return self.mode is ActivationCovariance.FULL


class Step:
    """A layer linearised at its input mean. ``mean``: (B, *out_shape)."""

    mean: torch.Tensor

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        """J applied to directions (B, N, *in_shape) -> (B, N, *out_shape)."""
        raise NotImplementedError

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        """Diagonal mode: output variances (B, *out_shape) (None: no variance)."""
        raise NotImplementedError

    def noise_full(self, cov_in: torch.Tensor | None) -> torch.Tensor | None:
        """Full mode: weight-noise covariance (B, D_out, D_out) given the input covariance, or None."""
        return None


def advance(state: Moments, step: Step, ctx: Context) -> Moments:
    """Apply a linearised layer to a state in the context's mode."""
    if not ctx.full:
        return Moments(step.mean, var=step.var(state.var))
    d_out = int(step.mean[0].numel())
    if d_out > ctx.max_full_dim:
        raise MemoryError(f"full activation covariance needs {d_out} x {d_out} per example (a layer output of "
                          f"shape {tuple(step.mean.shape[1:])}), above max_full_dim={ctx.max_full_dim}; use "
                          "activation_covariance='diagonal' or raise max_full_dim")
    cov = None if state.cov is None else sandwich(step.jac, state.cov, state.shape)
    cov = add_optional(cov, step.noise_full(state.cov))
    return Moments(step.mean, cov=cov, crosses=apply_to_crosses(step.jac, state.crosses, state.shape))


Rule = Callable[[nn.Module, Moments, Context, bool], Moments]
RULES: dict[type, Rule] = {}


def register_rule(*types: type) -> Callable[[Rule], Rule]:
    """Decorator: ``rule(module, state, ctx, last) -> Moments`` for exactly these module types."""

    def wrap(rule: Rule) -> Rule:
        for t in types:
            RULES[t] = rule
        return rule

    return wrap


# --------------------------------------------------------------------------- affine layers

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
        self.w_diag = self.w_kron = self.full = None
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
        if "weight" in post.diag:
            self.w_diag = post.diag["weight"].reshape(self.c_out, self.k)
        elif "weight" in post.kron:
            f = post.kron["weight"]
            self.w_kron = (f.q_out, f.q_in, f.inv, f.q_out.square(), f.q_in.square())
        if bias is not None and "bias" in post.diag:
            self.b_var = post.diag["bias"]
        elif bias is not None and "bias" in post.kron:
            self.b_cov = post.kron["bias"].dense_bias_cov()
            self.b_var = post.kron["bias"].q_out.square() @ post.kron["bias"].inv

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
    def full_cov(self, mu: torch.Tensor, cov: torch.Tensor | None = None, var: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """(B, L·C, L·C) weight-noise covariance; input mean μ (B, L, K) and covariance either
        ``cov`` (B, L·K, L·K) in (position, feature) order or diagonal ``var`` (B, L, K)."""
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
            else:
                m = mu.unsqueeze(2) * mu.unsqueeze(1)
                if cov5 is not None:
                    m = m + torch.diagonal(cov5, dim1=2, dim2=4)
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


def _affine_noise(module: nn.Module, ctx: Context) -> AffineNoise | None:
    post = ctx.posterior.get(module)
    if post is None or not (post.is_random("weight") or post.is_random("bias")):
        return None
    return AffineNoise(post, module.weight, module.bias, module)


class LinearStep(Step):
    """nn.Linear on (B, *lead, K): the lead dims are positions sharing W (tokens)."""

    def __init__(self, module: nn.Linear, state: Moments, ctx: Context) -> None:
        self.module, self.mu = module, state.mean
        self.noise = _affine_noise(module, ctx)
        self.mean = F.linear(state.mean, module.weight, module.bias)

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        return F.linear(directions, self.module.weight)

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        w_sq = self.module.weight.square()
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
        if self.noise is None:
            return None
        b = self.mu.shape[0]
        return self.noise.full_cov(self.mu.reshape(b, -1, self.noise.k), cov=cov_in)

    def cov_from_var(self, var_in: torch.Tensor | None) -> torch.Tensor:
        """(B, C, C) output covariance for 2-D inputs with independent units (diagonal mode's last layer)."""
        w = self.module.weight
        b = self.mu.shape[0]
        cov = self.mean.new_zeros(b, w.shape[0], w.shape[0])
        if var_in is not None:
            cov = cov + (w * var_in.unsqueeze(1)) @ w.T
        if self.noise is not None:
            cov = cov + self.noise.full_cov(self.mu.unsqueeze(1), var=None if var_in is None else var_in.unsqueeze(1))
        return 0.5 * (cov + cov.transpose(1, 2))


@register_rule(nn.Linear)
def linear_rule(module: nn.Linear, state: Moments, ctx: Context, last: bool) -> Moments:
    """Linear: exact moments of W a + b for Gaussian a independent of (W, b).

    Diagonal mode: σ²_h = W̄² σ²_a + Var(δW μ_a + δb) + Var(δW)·σ²_a (per position); as the
    last layer of a diagonal-mode walk on 2-D inputs the (B, C, C) output covariance is
    returned (input units independent). Full mode: Σ_h = W̄ Σ_a W̄ᵀ + E[δW (Σ_a + μμᵀ) δWᵀ] + Σ_b.
    """
    step = LinearStep(module, state, ctx)
    if last and not ctx.full and state.mean.ndim == 2 and not state.crosses:
        return Moments(step.mean, cov=step.cov_from_var(state.var))
    return advance(state, step, ctx)


def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str) and \
            module.padding != "valid":
        raise UnsupportedLayerError(f"Conv2d with groups={module.groups}, padding={module.padding!r}, "
                                    f"padding_mode={module.padding_mode!r} is not supported; supported: groups=1, "
                                    "integer padding, padding_mode='zeros'")
    return (0, 0) if module.padding == "valid" else tuple(module.padding)


class ConvStep(Step):
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
        return unfold_patches(x, m.kernel_size, m.dilation, self.padding, m.stride).transpose(1, 2)

    def _to_image(self, per_position: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (B, C, H', W')."""
        return per_position.transpose(1, 2).reshape(per_position.shape[0], *self.out_shape)

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        b, n = directions.shape[:2]
        out = self._conv(directions.reshape(b * n, *self.in_shape), self.module.weight)
        return out.reshape(b, n, *self.out_shape)

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        w_sq = self.module.weight.square()
        if self.noise is None:
            return None if var_in is None else self._conv(var_in, w_sq)
        if self.noise.w_diag is not None:  # conv(σ²_a, W̄² + S) + conv(μ², S): two convolutions, no unfolding
            s_w = self.noise.w_diag.reshape(w_sq.shape)
            noise = self._conv(self.mu.square(), s_w, self.noise.b_var)
            return noise if var_in is None else noise + self._conv(var_in, w_sq + s_w)
        noise_p = self.noise.shared(self._patches(self.mu))
        if var_in is not None:
            noise_p = noise_p + self.noise.from_input(self._patches(var_in))
        noise = self._to_image(noise_p)
        return noise if var_in is None else noise + self._conv(var_in, w_sq)

    def noise_full(self, cov_in: torch.Tensor | None) -> torch.Tensor | None:
        if self.noise is None:
            return None
        b, d = self.mu.shape[0], self.mu[0].numel()
        mu_p = self._patches(self.mu)
        n_pos, k = mu_p.shape[1:]
        cov_p = None
        if cov_in is not None:
            rows = self._patches(cov_in.reshape(b * d, *self.in_shape)).reshape(b, d, n_pos * k)
            cov_p = self._patches(rows.transpose(1, 2).reshape(b * n_pos * k, *self.in_shape))
            cov_p = cov_p.reshape(b, n_pos * k, n_pos * k)
        noise = self.noise.full_cov(mu_p, cov=cov_p)  # (position, channel) order
        c = self.noise.c_out
        return noise.reshape(b, n_pos, c, n_pos, c).permute(0, 2, 1, 4, 3).reshape(b, c * n_pos, c * n_pos)


@register_rule(nn.Conv2d)
def conv2d_rule(module: nn.Conv2d, state: Moments, ctx: Context, last: bool) -> Moments:
    """Conv2d: the Linear rules per output position on unfolded patches. Diagonal mode: a diagonal
    posterior costs two extra convolutions; KFAC/full unfold the patches. Full mode keeps the
    cross-position covariance the shared kernel induces (O((L·K)²) per example)."""
    return advance(state, ConvStep(module, state, ctx), ctx)


# --------------------------------------------------------------------------- element-wise

def _activation_derivative(module: nn.Module, mu: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.ReLU):
        return mu > 0  # a mask: multiplying by it needs no float copy and no squaring
    if isinstance(module, nn.Tanh):
        return 1 - torch.tanh(mu).square()
    if isinstance(module, nn.Sigmoid):
        s = torch.sigmoid(mu)
        return s * (1 - s)
    # SiLU and GELU: torch's own fused derivative kernels (one op instead of about ten elementwise ones)
    if isinstance(module, nn.SiLU):
        return torch.ops.aten.silu_backward(torch.ones_like(mu), mu)
    if isinstance(module, nn.GELU):
        return torch.ops.aten.gelu_backward(torch.ones_like(mu), mu, approximate=module.approximate)
    raise UnsupportedLayerError(type(module).__name__)


class ElementwiseStep(Step):
    def __init__(self, mean: torch.Tensor, slope: torch.Tensor) -> None:
        self.mean, self.slope = mean, slope

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        return directions * self.slope.unsqueeze(1)

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        if var_in is None:
            return None
        if self.slope.dtype == torch.bool:
            return var_in * self.slope
        return torch.mul(var_in, self.slope).mul_(self.slope)


@register_rule(nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU)
def activation_rule(module: nn.Module, state: Moments, ctx: Context, last: bool) -> Moments:
    """g linearised at the mean: μ <- g(μ), Σ <- D Σ D with D = diag(g'(μ)) (ReLU: g'(0) = 0)."""
    step = ElementwiseStep(module(state.mean), _activation_derivative(module, state.mean))
    return advance(state, step, ctx)


@register_rule(nn.Dropout, nn.Identity)
def identity_rule(module: nn.Module, state: Moments, ctx: Context, last: bool) -> Moments:
    """Identity (Dropout at test time)."""
    return state


@register_rule(nn.Flatten)
def flatten_rule(module: nn.Flatten, state: Moments, ctx: Context, last: bool) -> Moments:
    """A re-indexing: the full covariance's row-major order is unchanged."""
    return rearrange(state, module)


# --------------------------------------------------------------------------- pooling

class MaxPoolStep(Step):
    """Passes the moments of the input that is the argmax of the mean in each window."""

    def __init__(self, module: nn.MaxPool2d, state: Moments) -> None:
        m = module
        self.mean, self.index = F.max_pool2d(state.mean, m.kernel_size, m.stride, m.padding, m.dilation,
                                             ceil_mode=m.ceil_mode, return_indices=True)

    def _gather(self, x: torch.Tensor, lead: int) -> torch.Tensor:
        index = self.index.flatten(2)  # (B, C, L_out)
        if lead:
            index = index.unsqueeze(1).expand(x.shape[0], x.shape[1], *index.shape[1:])
        out = torch.gather(x.flatten(-2), -1, index)
        return out.reshape(*x.shape[:-2], *self.mean.shape[-2:])

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        return self._gather(directions, lead=1)

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        return None if var_in is None else self._gather(var_in, lead=0)


@register_rule(nn.MaxPool2d)
def maxpool_rule(module: nn.MaxPool2d, state: Moments, ctx: Context, last: bool) -> Moments:
    """Max pooling: the moments of the argmax-of-mean input of each window."""
    if state.mean.ndim != 4:
        raise UnsupportedLayerError("MaxPool2d on batched (B, C, H, W) inputs only")
    return advance(state, MaxPoolStep(module, state), ctx)


class LinearMapStep(Step):
    """A fixed linear map f (no weights): J = f, diagonal variances by (F∘F) var."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], state: Moments,
                 var_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn, self.var_fn, self.in_shape = fn, var_fn, state.shape
        self.mean = fn(state.mean)

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        b, n = directions.shape[:2]
        out = self.fn(directions.reshape(b * n, *self.in_shape))
        return out.reshape(b, n, *out.shape[1:])

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        return None if var_in is None else self.var_fn(var_in)


@register_rule(nn.AvgPool2d, nn.AdaptiveAvgPool2d)
def avgpool_rule(module: nn.Module, state: Moments, ctx: Context, last: bool) -> Moments:
    """Average pooling is linear: exact in full mode; diagonal mode sums window variances / n²."""
    if isinstance(module, nn.AvgPool2d):
        kh, kw = nn.modules.utils._pair(module.kernel_size)
        pad = nn.modules.utils._pair(module.padding)
        if module.divisor_override is not None or (any(pad) and not module.count_include_pad):
            raise UnsupportedLayerError("AvgPool2d with divisor_override or count_include_pad=False and padding")

        def var_fn(v: torch.Tensor) -> torch.Tensor:
            return module(v) / (kh * kw)
    else:
        h, w = state.shape[-2:]
        oh, ow = nn.modules.utils._pair(module.output_size)
        oh, ow = oh or h, ow or w
        if h % oh or w % ow:
            raise UnsupportedLayerError(f"AdaptiveAvgPool2d({module.output_size}) on {h}x{w} inputs has unequal "
                                        "windows; supported: sizes that divide the input")
        kh, kw = h // oh, w // ow

        def var_fn(v: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(v, (kh, kw)) / (kh * kw)
    return advance(state, LinearMapStep(module, state, var_fn), ctx)


# --------------------------------------------------------------------------- normalisation

def _feature_ids(shape: tuple[int, ...], feature_axis: int, device) -> torch.Tensor:
    """(D,) the feature (channel) of each flattened position."""
    ids = torch.arange(shape[feature_axis], device=device)
    view = [1] * len(shape)
    view[feature_axis] = shape[feature_axis]
    return ids.reshape(view).expand(shape).reshape(-1)


class AffineNormStep(Step):
    """y = γ ⊙ n(x) + β with n linearised (``n_jac``); γ, β may carry diagonal variances."""

    def __init__(self, mean_n: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                 gamma_var: torch.Tensor | None, beta_var: torch.Tensor | None, feature_axis: int,
                 n_jac: Callable[[torch.Tensor], torch.Tensor], n_var: Callable[[torch.Tensor], torch.Tensor],
                 in_shape: tuple[int, ...]) -> None:
        self.mean_n, self.n_jac, self.n_var, self.in_shape = mean_n, n_jac, n_var, in_shape
        shape = [1] * (mean_n.ndim - 1)
        shape[feature_axis] = -1
        self._view = lambda t: None if t is None else t.reshape(shape)
        self.gamma, self.beta = self._view(gamma), self._view(beta)
        self.gamma_var, self.beta_var = self._view(gamma_var), self._view(beta_var)
        self.feature_axis = feature_axis
        if self.gamma is not None and self.beta is not None:
            self.mean = torch.addcmul(self.beta, mean_n, self.gamma)
        else:
            mean = mean_n if self.gamma is None else mean_n * self.gamma
            self.mean = mean if self.beta is None else mean + self.beta

    def _scale(self, x: torch.Tensor, power: int = 1) -> torch.Tensor:
        return x if self.gamma is None else x * self.gamma**power

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        return self._scale(self.n_jac(directions))

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        # (γ̄² + Var γ) var_n + Var(γ) n̄² + Var(β), accumulated in place on the fresh output
        var_n = None if var_in is None else self.n_var(var_in)
        out = None
        if var_n is not None:
            coef = None if self.gamma is None else self.gamma.square()
            if self.gamma_var is not None:
                coef = self.gamma_var if coef is None else coef + self.gamma_var
            out = var_n if coef is None else var_n * coef
        if self.gamma_var is not None:
            term = self.mean_n.square().mul_(self.gamma_var)
            out = term if out is None else out.add_(term)
        if self.beta_var is not None:
            out = self.beta_var.expand_as(self.mean_n).clone() if out is None else out.add_(self.beta_var)
        return out

    def noise_full(self, cov_in: torch.Tensor | None) -> torch.Tensor | None:
        if self.gamma_var is None and self.beta_var is None:
            return None
        b = self.mean_n.shape[0]
        ids = _feature_ids(self.in_shape, self.feature_axis, self.mean_n.device)
        same = (ids[:, None] == ids[None, :]).to(self.mean_n.dtype)
        noise = self.mean_n.new_zeros(b, ids.numel(), ids.numel())
        if self.gamma_var is not None:
            mu = self.mean_n.reshape(b, -1)
            second = mu.unsqueeze(2) * mu.unsqueeze(1)
            if cov_in is not None:
                second = second + sandwich(self.n_jac, cov_in, self.in_shape)
            noise = noise + second * same * self.gamma_var.reshape(-1)[ids].unsqueeze(1)
        if self.beta_var is not None:
            noise = noise + same * self.beta_var.reshape(-1)[ids].unsqueeze(1)
        return noise


def _param_var(post: LayerPosterior | None, attr: str, what: str) -> torch.Tensor | None:
    if post is None or not post.is_random(attr):
        return None
    if attr not in post.diag:
        raise ValueError(f"{what}.{attr} has a non-diagonal posterior; only diagonal variances are supported there: "
                         "use a diag, kron or ekfac Laplace (they give this layer diagonal variances), or a full "
                         "Laplace on subset_of_weights='last_layer'")
    return post.diag[attr]


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d)
def batchnorm_rule(module: nn.Module, state: Moments, ctx: Context, last: bool) -> Moments:
    """BatchNorm in eval mode: a per-channel affine map (random γ, β with diagonal variances allowed)."""
    if module.training or module.running_var is None:
        raise ValueError(f"{type(module).__name__} must be in eval mode with running statistics "
                         "(call model.eval())")
    shape = [1] * state.mean.ndim
    shape[1] = -1
    inv_sd = torch.rsqrt(module.running_var + module.eps).reshape(shape)
    mean_n = (state.mean - module.running_mean.reshape(shape)) * inv_sd
    inv_sd_dir = inv_sd.unsqueeze(1)
    post = ctx.posterior.get(module)
    step = AffineNormStep(mean_n, module.weight, module.bias, _param_var(post, "weight", "BatchNorm"),
                          _param_var(post, "bias", "BatchNorm"), 0, lambda d: d * inv_sd_dir,
                          lambda v: v * inv_sd.square(), state.shape)
    return advance(state, step, ctx)


@register_rule(nn.LayerNorm)
def layernorm_rule(module: nn.LayerNorm, state: Moments, ctx: Context, last: bool) -> Moments:
    """LayerNorm over the last axis. ``frozen``: mean/std of the mean input held fixed (affine per token);
    ``linearized``: the Jacobian (I - 11ᵀ/D - n nᵀ/D)/s at the mean (diagonal mode: its squared rows
    applied to the variances, O(D))."""
    if len(module.normalized_shape) != 1:
        raise UnsupportedLayerError("LayerNorm over the last axis only (normalized_shape of length 1)")
    mu = state.mean
    centred = mu - mu.mean(-1, keepdim=True)
    inv_s = torch.rsqrt(centred.square().mean(-1, keepdim=True) + module.eps)
    n = centred * inv_s
    d = mu.shape[-1]
    if ctx.layernorm is LayerNormRule.FROZEN:
        def n_jac(x):
            return x * inv_s.unsqueeze(1)

        def n_var(v):
            return v * inv_s.square()
    else:
        n_dir, inv_s_dir = n.unsqueeze(1), inv_s.unsqueeze(1)

        def n_jac(x):
            return (x - x.mean(-1, keepdim=True) - n_dir * (n_dir * x).mean(-1, keepdim=True)) * inv_s_dir

        def n_var(v):
            # Σ_i J_ji² v_i with J_ji = (δ_ji - (1 + n_j n_i)/D)/s
            s0, s1, s2 = v.sum(-1, keepdim=True), (n * v).sum(-1, keepdim=True), (n * n * v).sum(-1, keepdim=True)
            out = v * (1 - 2 * (1 + n * n) / d) + (s0 + 2 * n * s1 + n * n * s2) / d**2
            return out * inv_s.square()
    post = ctx.posterior.get(module)
    step = AffineNormStep(n, module.weight, module.bias, _param_var(post, "weight", "LayerNorm"),
                          _param_var(post, "bias", "LayerNorm"), mu.ndim - 2, n_jac, n_var, state.shape)
    return advance(state, step, ctx)
