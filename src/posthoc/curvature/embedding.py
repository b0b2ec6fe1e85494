"""The exact diagonal curvature of an ``nn.Embedding`` weight from its output gradients, at O(B·L·D) memory.

An embedding's per-example gradient is sparse: row v of J_nᵀ s of the weight (V, D) is Σ_{l: x_nl = v} g_nl, the
output gradients at the positions holding token v. So the exact diagonal Σ_n Σ_k (J_nᵀ s_nk)² and the glm term
J_n diag(w) J_nᵀ need only the segment sums of g over the distinct (example, token) pairs (at most B·L of them),
never the dense (V, D) per-example gradient that a generic per-example VJP builds (B·K·V·D: a GPT-2-sized
vocabulary makes that 38M entries per example and column). Tokens equal to ``padding_idx`` get no gradient, as
in PyTorch. Used by the Kronecker structures for an embedding called once per forward whose weight is read
only there (a weight tied to an output head goes to the generic route); ``max_norm`` (renormalises the weight in
place) and ``scale_grad_by_freq`` (rescales the gradient) also do.
"""

from __future__ import annotations

import torch
from torch import nn


def embedding_route_ok(module: nn.Module) -> bool:
    """Whether ``module`` is an nn.Embedding whose weight's gradient is the segment sum of its output gradients."""
    return isinstance(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq


def _segments(tokens: torch.Tensor, module: nn.Embedding) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inverse (B·L,), rows (U,), example (U,)) for the U distinct (example, token) pairs of tokens (B, ...)."""
    flat = tokens.reshape(tokens.shape[0], -1).long()
    n_rows = module.num_embeddings
    keys = (torch.arange(flat.shape[0], device=flat.device)[:, None] * n_rows + flat).reshape(-1)
    unique, inverse = torch.unique(keys, return_inverse=True)
    return inverse, unique % n_rows, unique // n_rows


def _masked(tokens: torch.Tensor, grads: torch.Tensor, module: nn.Embedding) -> torch.Tensor:
    """The gradients (B, ..., D, L) with the positions of ``padding_idx`` zeroed (that row gets no gradient)."""
    if module.padding_idx is None:
        return grads
    keep = tokens.reshape(tokens.shape[0], -1) != module.padding_idx  # (B, L)
    return grads * keep.view(keep.shape[0], *([1] * (grads.ndim - 2)), keep.shape[1]).to(grads.dtype)


def embedding_squared_gradients(tokens: torch.Tensor, grads: torch.Tensor, module: nn.Embedding) -> torch.Tensor:
    """Σ_n (Σ_{l: x_nl = v} g_nl)² for every row v: (V·D,) in the weight's row-major order.

    ``tokens`` (B, ...) the layer's input, ``grads`` (B, D, L) the gradient of one output column in the layer's
    output (channels first, L the positions of ``tokens``). Cost O(B·L·D) plus a sort of B·L keys.
    """
    inverse, rows, _ = _segments(tokens, module)
    g = _masked(tokens, grads, module)
    sums = g.new_zeros(rows.numel(), g.shape[1]).index_add_(0, inverse, g.mT.reshape(-1, g.shape[1]))
    return g.new_zeros(module.num_embeddings, g.shape[1]).index_add_(0, rows, sums.square()).reshape(-1)


def embedding_grams(tokens: torch.Tensor, grads: torch.Tensor, module: nn.Embedding,
                    weights: torch.Tensor) -> torch.Tensor:
    """J_n diag(w) J_nᵀ of the embedding weight for every example: (B, C, C).

    ``grads`` (B, C, D, L) the gradients of the C outputs in the layer's output, ``weights`` (V·D,) w in the
    weight's row-major order. Cost O(B·L·C²·D).
    """
    inverse, rows, example = _segments(tokens, module)
    g = _masked(tokens, grads, module)
    n, n_out, dim, n_pos = g.shape
    per_position = g.permute(0, 3, 1, 2).reshape(n * n_pos, n_out, dim)
    sums = g.new_zeros(rows.numel(), n_out, dim).index_add_(0, inverse, per_position)  # (U, C, D)
    w = weights.view(module.num_embeddings, dim)[rows]  # (U, D)
    per_pair = torch.einsum("ucd,ud,ued->uce", sums, w, sums)
    return per_pair.new_zeros(n, n_out, n_out).index_add_(0, example, per_pair)
