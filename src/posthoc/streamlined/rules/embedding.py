"""The rule for nn.Embedding: lookups of integer ids, random rows when the table has a diagonal posterior."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from posthoc.streamlined.moments import Moments
from posthoc.streamlined.rules.base import Context, UnsupportedLayerError, register_rule


@register_rule(nn.Embedding)
def embedding_rule(module: nn.Embedding, state: Moments, ctx: Context, last: bool) -> Moments:
    """Rows W[ids] of the table for integer ids (B, *T) -> (B, *T, D); the ids are deterministic.

    A diagonal posterior on the weight gives each looked-up entry its variance. Full mode: the same id at two
    positions reads the same random row, so Cov(out_t, out_s) = diag(Var W[id]) where id_t = id_s (and zero
    elsewhere), O((T·D)²) per example. Raises UnsupportedLayerError for random (noisy) ids or float inputs, and
    ValueError for a Kronecker or full posterior on the table (diagonal only).
    """
    if state.mean.is_floating_point() or state.var is not None or state.cov is not None:
        raise UnsupportedLayerError("nn.Embedding takes deterministic integer ids; got a random or float input")
    ids = state.mean
    mean = F.embedding(ids, module.weight, module.padding_idx, module.max_norm, module.norm_type,
                       module.scale_grad_by_freq, module.sparse)
    post = ctx.posterior.get(module)
    if post is None or not post.is_random("weight"):
        return Moments(mean)
    if "weight" not in post.diag:
        raise ValueError("nn.Embedding's weight supports a diagonal posterior only (diag Laplace or mean field)")
    var = post.diag["weight"][ids]  # (B, *T, D)
    if not ctx.full:
        return Moments(mean, var=var)
    batch = ids.shape[0]
    flat_ids = ids.reshape(batch, -1)  # (B, T)
    same = (flat_ids.unsqueeze(2) == flat_ids.unsqueeze(1)).to(var.dtype)  # (B, T, T)
    flat_var = var.reshape(batch, flat_ids.shape[1], -1)  # (B, T, D)
    cov = same[:, :, None, :, None] * torch.diag_embed(flat_var).unsqueeze(3)  # (B, T, D, T, D)
    return Moments(mean, cov=cov.reshape(batch, mean[0].numel(), mean[0].numel()))
