"""The module rules' walk, and the rules (graphs) of posthoc's own blocks that are not one layer.

A model is propagated through its torch.fx graph (:mod:`posthoc.streamlined.traced`); every module with a rule in
the one registry (:data:`posthoc.streamlined.rules.RULES`, exact type match, filled by
:func:`posthoc.streamlined.rules.register_rule`) is a leaf of that graph. The rules here describe posthoc's
residual block, transformer block, attention, patch and positional embedding and token pooling as module-level
graphs, because their approximations are stated per block ("Q, K deterministic, V random", the shared random W_v,
LayerNorm statistics frozen or linearised); attention written with traced ops (matmul, softmax,
scaled_dot_product_attention: :mod:`posthoc.streamlined.rules.attention`) gets the independent-token rule only. Inside them :func:`propagate` walks a container without a rule as the chain of its children.

Residual connections: diagonal mode adds means and variances (the authors' rule, the
branch/skip covariance dropped). Full mode keeps that covariance: the branch carries its
cross-covariance with the block input (J_branch Σ_x, one extra D x D product per layer), and
the join adds Cov(branch, skip) + its transpose.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from posthoc.models.resnet import ResidualBlock
from posthoc.models.vit import (
    MultiHeadSelfAttention,
    PatchEmbedding,
    PositionalEmbedding,
    TokenMeanPool,
    TransformerBlock,
)
from posthoc.streamlined.moments import Moments, add_optional, rearrange
from posthoc.streamlined.rules import (
    RULES,
    Context,
    LinearMapStep,
    Step,
    UnsupportedLayerError,
    advance,
    register_rule,
)
from posthoc.streamlined.rules.base import RuleT, find_rule
from posthoc.streamlined.rules.multihead import attend_values


def register_graph(*types: type, replace: bool = False) -> Callable[[RuleT], RuleT]:
    """Decorator: ``graph(module, state, ctx, last) -> Moments`` for a non-chain forward; the one rule registry.

    The same as :func:`posthoc.streamlined.rules.register_rule` (kept for the graphs of posthoc's own blocks).
    """
    return register_rule(*types, replace=replace)


def supported_layers() -> list[str]:
    """The names of the module types with a rule (sorted), for error messages and docs.

    Containers without a rule (nn.Sequential, a user's network) need none: their forward is traced.
    """
    return sorted({key.rpartition(".")[2] for key in RULES if key.startswith("module ")})


def propagate(module: nn.Module, state: Moments, ctx: Context, last: bool = False) -> Moments:
    """Propagate a state through ``module``; ``last`` marks the network's final layer."""
    rule = find_rule(type(module))
    if rule is not None:
        return rule(module, state, ctx, last)
    children = list(module.children())
    if children:
        for i, child in enumerate(children):
            state = propagate(child, state, ctx, last and i == len(children) - 1)
        return state
    raise unsupported_module(module)


def unsupported_module(module: nn.Module) -> UnsupportedLayerError:
    """The error for a module without a rule: its type, the supported layers and register_rule."""
    return UnsupportedLayerError(f"no moment-propagation rule for {type(module).__name__}; supported layers: "
                                 f"{', '.join(supported_layers())}, and any container whose forward torch.fx traces "
                                 "(add one with posthoc.streamlined.register_rule)")


def residual(state: Moments, branch: Callable[[Moments], Moments], ctx: Context,
             shortcut: Callable[[Moments], Moments] | None = None) -> Moments:
    """branch(x) + shortcut(x) (identity when None); see the module docstring for the covariances."""
    if not (ctx.full and state.cov is not None):
        b = branch(state)
        s = state if shortcut is None else shortcut(state)
        if ctx.full:  # a deterministic input: branch and skip noise come from different weights
            return Moments(b.mean + s.mean, cov=add_optional(b.cov, s.cov))
        return Moments(b.mean + s.mean, var=add_optional(b.var, s.var))
    b = branch(Moments(state.mean, cov=state.cov, crosses=[*state.crosses, state.cov]))
    cross_b = b.crosses.pop()  # Cov(branch, x) (B, D_b, D_x)
    if shortcut is None:
        s, cross_sb = state, cross_b.transpose(1, 2)
    else:
        s = shortcut(Moments(state.mean, cov=state.cov, crosses=[*state.crosses, cross_b.transpose(1, 2)]))
        cross_sb = s.crosses.pop()  # Cov(shortcut, branch)
    if b.cov is None or s.cov is None:  # full mode with a random input: every rule returns a covariance
        raise RuntimeError("a residual branch lost its covariance in full mode; its rules must return cov")
    cov = b.cov + s.cov + cross_sb + cross_sb.transpose(1, 2)
    crosses = [cb + cs for cb, cs in zip(b.crosses, s.crosses, strict=True)]
    return Moments(b.mean + s.mean, cov=0.5 * (cov + cov.transpose(1, 2)), crosses=crosses)


def _chain(*modules: nn.Module) -> Callable[[Moments, Context], Moments]:
    def run(state: Moments, ctx: Context) -> Moments:
        for m in modules:
            state = propagate(m, state, ctx)
        return state
    return run


@register_graph(ResidualBlock)
def residual_block_graph(module: ResidualBlock, state: Moments, ctx: Context, last: bool) -> Moments:
    """act2(branch(x) + shortcut(x))."""
    branch = _chain(module.conv1, module.bn1, module.act1, module.conv2, module.bn2)
    shortcut = None if isinstance(module.shortcut, nn.Identity) else _chain(module.shortcut)
    out = residual(state, lambda s: branch(s, ctx), ctx, None if shortcut is None else lambda s: shortcut(s, ctx))
    return propagate(module.act2, out, ctx)


@register_graph(TransformerBlock)
def transformer_block_graph(module: TransformerBlock, state: Moments, ctx: Context, last: bool) -> Moments:
    """X + attn(ln1(x)), then x + mlp(ln2(x))."""
    state = residual(state, lambda s: _chain(module.ln1, module.attn)(s, ctx), ctx)
    return residual(state, lambda s: _chain(module.ln2, module.mlp)(s, ctx), ctx)


@register_graph(PatchEmbedding)
def patch_embedding_graph(module: PatchEmbedding, state: Moments, ctx: Context, last: bool) -> Moments:
    """Conv2d, then (B, D, h, w) -> (B, T, D) by re-indexing."""
    state = propagate(module.proj, state, ctx)
    return rearrange(state, lambda t: t.flatten(2).transpose(1, 2))


class ShiftStep(Step):
    """x + w with a (possibly random, diagonal-variance) table w."""

    def __init__(self, state: Moments, weight: torch.Tensor, weight_var: torch.Tensor | None) -> None:
        self.mean, self.weight_var = state.mean + weight, weight_var

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        """J on directions (B, N, *in_shape) -> (B, N, *out_shape): the identity."""
        return directions

    def var(self, var_in):
        """Output variances: the input variances plus the table's (None when neither has any)."""
        return add_optional(var_in, None if self.weight_var is None else self.weight_var.expand_as(self.mean))

    def noise_full(self, cov_in):
        """The table's diagonal variances as a (B, D, D) covariance, or None for a fixed table."""
        if self.weight_var is None:
            return None
        return torch.diag_embed(self.weight_var.reshape(1, -1).expand(self.mean.shape[0], -1))


@register_graph(PositionalEmbedding)
def positional_embedding_graph(module: PositionalEmbedding, state: Moments, ctx: Context, last: bool) -> Moments:
    """Add the positional table to x; its weight may carry a diagonal posterior (ValueError for another form)."""
    post = ctx.posterior.get(module)
    var = None if post is None else post.diag.get("weight")
    if post is not None and var is None and post.is_random("weight"):
        raise ValueError("PositionalEmbedding.weight supports a diagonal posterior only")
    return advance(state, ShiftStep(state, module.weight, var), ctx)


@register_graph(TokenMeanPool)
def token_mean_pool_graph(module: TokenMeanPool, state: Moments, ctx: Context, last: bool) -> Moments:
    """Mean over tokens (linear; diagonal mode: Σ_t var_t / T²)."""
    n_tokens = state.shape[0]
    return advance(state, LinearMapStep(module, state, lambda v: v.sum(1) / n_tokens**2), ctx)


@register_graph(MultiHeadSelfAttention)
def attention_graph(module: MultiHeadSelfAttention, state: Moments, ctx: Context, last: bool) -> Moments:
    """Self-attention with Q, K deterministic and V random: out = out_proj(A v), linear in v.

    Q and K come from the mean input and mean weights (their posterior is not used).

    Diagonal mode: ``attention="independent"`` Σ_o,t = Σ_s A_ts² Σ_v,s (the authors' rule), or
    ``"shared_value"`` (see :func:`posthoc.streamlined.rules.multihead.shared_value_variance`). Full mode carries the complete
    cross-token covariance of v (shared W_v included) through the mixing.
    """
    with torch.no_grad():
        weights = module.attention_weights(state.mean)
    return attend_values(state, weights, module.v_proj, module.out_proj, module.n_heads, ctx, last)
