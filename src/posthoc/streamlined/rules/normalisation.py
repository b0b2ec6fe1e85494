"""Rules for normalisation layers: BatchNorm in eval mode and LayerNorm.

BatchNorm in eval mode is a per-channel affine map; LayerNorm has frozen or linearised statistics. Their γ and β
may carry diagonal posterior variances.
"""

from __future__ import annotations

from typing import Callable, cast

import torch
import torch.nn.functional as F
from torch import nn

from posthoc.streamlined.moments import Moments, sandwich
from posthoc.streamlined.rules.base import Context, LayerNormRule, Step, UnsupportedLayerError, advance, register_rule
from posthoc.streamlined.weight_posteriors import LayerPosterior


def _feature_ids(shape: tuple[int, ...], feature_axis: int, device) -> torch.Tensor:
    """(D,) the feature (channel) of each flattened position."""
    ids = torch.arange(shape[feature_axis], device=device)
    view = [1] * len(shape)
    view[feature_axis] = shape[feature_axis]
    return ids.reshape(view).expand(shape).reshape(-1)


class AffineNormStep(Step):
    """y = γ ⊙ n(x) + β with n linearised (``n_jac``); γ, β may carry diagonal variances.

    ``n_var`` maps input variances to those of n, or is the per-feature factor (shaped like γ's view) that scales
    them when n is a per-feature affine map (BatchNorm): then one fused product gives the output variances.
    """

    def __init__(self, mean_n: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                 gamma_var: torch.Tensor | None, beta_var: torch.Tensor | None, feature_axis: int,
                 n_jac: Callable[[torch.Tensor], torch.Tensor],
                 n_var: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor, in_shape: tuple[int, ...]) -> None:
        self.mean_n, self.n_jac, self.n_var, self.in_shape = mean_n, n_jac, n_var, in_shape
        shape = [1] * (mean_n.ndim - 1)
        shape[feature_axis] = -1
        self._view = lambda t: None if t is None else t.reshape(shape)
        self.gamma, self.beta = self._view(gamma), self._view(beta)
        self.gamma_var, self.beta_var = self._view(gamma_var), self._view(beta_var)
        if isinstance(n_var, torch.Tensor):
            self.n_var = n_var.reshape(shape)
        self.feature_axis = feature_axis
        if self.gamma is not None and self.beta is not None:
            self.mean = torch.addcmul(self.beta, mean_n, self.gamma)
        else:
            mean = mean_n if self.gamma is None else mean_n * self.gamma
            self.mean = mean if self.beta is None else mean + self.beta

    @property
    def has_noise(self) -> bool:
        """Whether γ or β is random."""
        return self.gamma_var is not None or self.beta_var is not None

    def _scale(self, x: torch.Tensor, power: int = 1) -> torch.Tensor:
        return x if self.gamma is None else x * self.gamma**power

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        """J on directions (B, N, *in_shape) -> (B, N, *out_shape): the linearised normalisation, scaled by γ̄."""
        return self._scale(self.n_jac(directions))

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        """Output variances (B, *shape) including the diagonal noise of γ and β (None without variance).

        (γ̄² + Var γ) var_n + Var(γ) n̄² + Var(β): about four elementwise passes over the activations, fused
        products accumulated in place on the fresh output.
        """
        out = None
        if var_in is not None:
            coef = None if self.gamma is None else self.gamma.square()
            if self.gamma_var is not None:
                coef = self.gamma_var if coef is None else coef + self.gamma_var
            if isinstance(self.n_var, torch.Tensor):  # n per-feature affine: one factor on the input variances
                var_n, coef = var_in, self.n_var if coef is None else self.n_var * coef
            else:
                var_n = self.n_var(var_in)
            if coef is None:
                out = var_n if self.beta_var is None else var_n + self.beta_var
            elif self.beta_var is None:
                out = var_n * coef
            else:
                out = torch.addcmul(self.beta_var, var_n, coef)
        elif self.beta_var is not None:
            out = self.beta_var.expand_as(self.mean_n).clone()
        if self.gamma_var is not None:
            term = self.mean_n * self.gamma_var
            out = term.mul_(self.mean_n) if out is None else out.addcmul_(term, self.mean_n)
        return out

    def noise_full(self, cov_in: torch.Tensor | None) -> torch.Tensor | None:
        """The covariance (B, D, D) that the noise of γ and β adds (given the input covariance), or None."""
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
def batchnorm_rule(module: nn.BatchNorm1d | nn.BatchNorm2d, state: Moments, ctx: Context, last: bool) -> Moments:
    """BatchNorm in eval mode: a per-channel affine map (random γ, β with diagonal variances allowed)."""
    if module.training or module.running_var is None or module.running_mean is None:
        raise ValueError(f"{type(module).__name__} must be in eval mode with running statistics "
                         "(call model.eval())")
    post = ctx.posterior.get(module)
    gamma_var, beta_var = _param_var(post, "weight", "BatchNorm"), _param_var(post, "bias", "BatchNorm")
    if not ctx.full:
        return _batchnorm_diagonal(module, state, gamma_var, beta_var)
    shape = [1] * state.mean.ndim
    shape[1] = -1
    inv_sd = torch.rsqrt(module.running_var + module.eps).reshape(shape)
    mean_n = torch.addcmul(-module.running_mean.reshape(shape) * inv_sd, state.mean, inv_sd)  # (μ - m) / sd
    inv_sd_dir = inv_sd.unsqueeze(1)
    step = AffineNormStep(mean_n, module.weight, module.bias, gamma_var, beta_var, 0, lambda d: d * inv_sd_dir,
                          inv_sd.square().reshape(-1), state.shape)
    return advance(state, step, ctx)


def _channel_affine(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                    centre: torch.Tensor | None = None) -> torch.Tensor:
    """(x - centre)·scale + shift per channel (axis 1; scale, shift, centre (C,), None: 1, 0, 0), exactly.

    Through batch_norm with unit variance and eps = 0 (division by sqrt(1), exact): one fused pass, where a
    broadcast addcmul over (B, C, H, W) takes about twice as long on CPU.
    """
    channels = x.shape[1]
    zeros = x.new_zeros(channels) if centre is None else centre
    return F.batch_norm(x, zeros, x.new_ones(channels), scale, shift, False, 0.0, 0.0)


def _batchnorm_diagonal(module: nn.BatchNorm1d | nn.BatchNorm2d, state: Moments,
                        gamma_var: torch.Tensor | None, beta_var: torch.Tensor | None) -> Moments:
    """Diagonal mode of eval-mode BatchNorm y = γ (x - m)/sd + β per channel, γ and β random.

    Var y = (γ̄² + Var γ) var_x / sd² + Var(γ) (μ - m)² / sd² + Var β. The mean is the forward's own batch_norm;
    the variance takes at most three passes over the activations (the (μ - m)·√Var(γ)/sd term formed once and
    squared in place), where the general affine-norm step takes five.
    """
    running_mean, running_var = cast(torch.Tensor, module.running_mean), cast(torch.Tensor, module.running_var)
    mean = F.batch_norm(state.mean, running_mean, running_var, module.weight, module.bias, False, 0.0, module.eps)
    inv_var = torch.reciprocal(running_var + module.eps)
    var = None
    if state.var is not None:
        coef = inv_var if module.weight is None else inv_var * module.weight.square()
        if gamma_var is not None:
            coef = coef + inv_var * gamma_var
        var = _channel_affine(state.var, coef, beta_var)
    elif beta_var is not None:
        var = _channel_affine(torch.zeros_like(mean), None, beta_var)
    if gamma_var is not None:
        centred = _channel_affine(state.mean, (inv_var * gamma_var).sqrt(), None, running_mean)  # (μ-m)√Var γ/sd
        var = centred.square_() if var is None else var.addcmul_(centred, centred)
    return Moments(mean, var=var)


def input_variances(state: Moments) -> torch.Tensor | None:
    """The marginal variances of ``state``'s activations shaped like its mean (B, ...), or None without variance."""
    if state.cov is None:
        return state.var  # already shaped like the mean (flattening a non-contiguous one would copy it twice)
    flat = state.flat_var()
    return None if flat is None else flat.reshape(state.mean.shape)


def last_axis_normaliser(mu: torch.Tensor, eps: float, rule: LayerNormRule, var: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor],
                                    Callable[[torch.Tensor], torch.Tensor]]:
    """(x - mean) / std over the last axis of the mean ``mu`` (B, ..., D), frozen or linearised at ``mu``.

    Returns the normalised mean n, the map on directions (B, N, ..., D) and the diagonal-mode variance map on
    (B, ..., D) (frozen: scaled by 1/s; linearised: the squared rows of (I - 11ᵀ/D - n nᵀ/D)/s, O(D)).
    ``expected``: frozen, but scaled by 1/s_e with s_e² = s² + (1 - 1/D) mean_j Var x_j, the expected squared
    spread E[(1/D) Σ_j (x_j - x̄)²] of a random input with independent entries of variances ``var`` (shaped like
    ``mu``; None: no input variance, the frozen rule). The frozen rule divides the input's noise by the spread of
    the mean alone, which amplifies noise larger than that spread where the real LayerNorm bounds it; n (the
    mean) stays LayerNorm(μ) in every rule.
    """
    d = mu.shape[-1]
    n, _, inv_s = torch.native_layer_norm(mu, (d,), None, None, eps)  # one fused pass; inv_s (B, ..., 1)
    if rule is LayerNormRule.EXPECTED and var is not None:
        inv_s = (inv_s.square().reciprocal() + var.mean(-1, keepdim=True) * (1 - 1 / d)).rsqrt()
    if rule in (LayerNormRule.FROZEN, LayerNormRule.EXPECTED):
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
    return n, n_jac, n_var


@register_rule(nn.LayerNorm)
def layernorm_rule(module: nn.LayerNorm, state: Moments, ctx: Context, last: bool) -> Moments:
    """LayerNorm over the last axis, with frozen, linearised or expected statistics (``ctx.layernorm``).

    ``frozen``: mean/std of the mean input held fixed (affine per token); ``linearized``: the Jacobian
    (I - 11ᵀ/D - n nᵀ/D)/s at the mean (diagonal mode: its squared rows applied to the variances, O(D));
    ``expected``: frozen with the std of the random input (:func:`last_axis_normaliser`).
    Raises UnsupportedLayerError unless normalized_shape has length 1.
    """
    if len(module.normalized_shape) != 1:
        raise UnsupportedLayerError("LayerNorm over the last axis only (normalized_shape of length 1)")
    mu = state.mean
    n, n_jac, n_var = last_axis_normaliser(mu, module.eps, ctx.layernorm, input_variances(state))
    post = ctx.posterior.get(module)
    step = AffineNormStep(n, module.weight, module.bias, _param_var(post, "weight", "LayerNorm"),
                          _param_var(post, "bias", "LayerNorm"), mu.ndim - 2, n_jac, n_var, state.shape)
    return advance(state, step, ctx)
