"""Rules for two of posthoc's own blocks, keyed by class name so that posthoc.streamlined imports no model.

:mod:`posthoc.streamlined` knows no model: it traces a network's forward and applies one rule per leaf module and
op, and posthoc's networks go through that same path. Two blocks of :mod:`posthoc.models.vit` need a rule, as a
user's block with a stated approximation would; they are registered under the registry key of their class (its
import path, as transformers' NewGELUActivation is in :mod:`.aten`) and read the module by its attributes:

- ``MultiHeadSelfAttention`` (``attention_weights``, ``v_proj``, ``out_proj``, ``n_heads``): the authors' attention
  rule (Q and K from the mean input, V random) with ``attention="shared_value"``, which the traced matmul and
  softmax ops cannot give (an op rule sees the values' variances, not the one random W_v that correlates them).
- ``PositionalEmbedding`` (``weight``, added to the input): its table is a parameter read inside the forward, which
  the traced walk refuses when it is random; the rule adds the table with its diagonal variances.

ResidualBlock, TransformerBlock, PatchEmbedding and TokenMeanPool have no rule: they are traced like any network.
"""

from __future__ import annotations

from typing import Any

import torch

from posthoc.streamlined.moments import Moments, add_optional
from posthoc.streamlined.rules.affine import LinearStep
from posthoc.streamlined.rules.base import RULES, AttentionRule, Context, Step, advance
from posthoc.streamlined.rules.multihead import StackedStep, attend_values, linearised_self_attention
from posthoc.utils.registry import add_to_registry

ATTENTION_KEY = "module posthoc.models.vit.MultiHeadSelfAttention"  # rule_key of the class, without importing it
POSITIONAL_KEY = "module posthoc.models.vit.PositionalEmbedding"


def self_attention_rule(module: Any, state: Moments, ctx: Context, last: bool) -> Moments:
    """Self-attention with Q, K deterministic and V random: out = out_proj(A v), linear in v.

    Q and K come from the mean input and mean weights (their posterior is not used), except with
    ``attention="linearized"`` (full mode): the weights linearised in Q, K and V, each projection's noise included
    (:func:`posthoc.streamlined.rules.multihead.linearised_self_attention`). Diagonal mode:
    ``attention="independent"`` Σ_o,t = Σ_s A_ts² Σ_v,s (the authors' rule) or ``"shared_value"``
    (:func:`posthoc.streamlined.rules.multihead.shared_value_variance`). Full mode carries the complete cross-token
    covariance of v (shared W_v included) through the mixing.
    """
    if ctx.full and ctx.attention is AttentionRule.LINEARIZED:
        projections = StackedStep([LinearStep(p, state, ctx) for p in (module.q_proj, module.k_proj, module.v_proj)])
        qkv = advance(state, projections, ctx)
        return linearised_self_attention(qkv, module.n_heads, module.scale, module.out_proj, ctx, last)
    with torch.no_grad():
        weights = module.attention_weights(state.mean)
    return attend_values(state, weights, module.v_proj, module.out_proj, module.n_heads, ctx, last)


class ShiftStep(Step):
    """x + w with a (possibly random, diagonal-variance) table w (1, T, D)."""

    def __init__(self, state: Moments, weight: torch.Tensor, weight_var: torch.Tensor | None) -> None:
        self.mean, self.weight_var = state.mean + weight, weight_var

    @property
    def has_noise(self) -> bool:
        """Whether the table is random."""
        return self.weight_var is not None

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        """J on directions (B, N, *in_shape) -> (B, N, *out_shape): the identity."""
        return directions

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        """Output variances: the input variances plus the table's (None when neither has any)."""
        return add_optional(var_in, None if self.weight_var is None else self.weight_var.expand_as(self.mean))

    def noise_full(self, cov_in: torch.Tensor | None) -> torch.Tensor | None:
        """The table's diagonal variances as a (B, D, D) covariance, or None for a fixed table."""
        if self.weight_var is None:
            return None
        return torch.diag_embed(self.weight_var.reshape(1, -1).expand(self.mean.shape[0], -1))


def positional_embedding_rule(module: Any, state: Moments, ctx: Context, last: bool) -> Moments:
    """Add the positional table to x; its weight may carry a diagonal posterior (ValueError for another form)."""
    post = ctx.posterior.get(module)
    var = None if post is None else post.diag.get("weight")
    if post is not None and var is None and post.is_random("weight"):
        raise ValueError("PositionalEmbedding.weight supports a diagonal posterior only")
    return advance(state, ShiftStep(state, module.weight, var), ctx)


add_to_registry(RULES, ATTENTION_KEY, self_attention_rule, "moment-propagation rule")
add_to_registry(RULES, POSITIONAL_KEY, positional_embedding_rule, "moment-propagation rule")
