"""A small vision transformer for 28×28 inputs, with attention written out explicitly.

Every learned map is an ``nn.Linear``/``nn.Conv2d`` and the attention softmax is computed
by hand from explicit ``q_proj``/``k_proj``/``v_proj``/``out_proj`` layers (no
``nn.MultiheadAttention``), so curvature hooks and moment propagation can see each piece.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from posthoc.utils.checks import check_positive_int

__all__ = [
    "MultiHeadSelfAttention",
    "PatchEmbedding",
    "PositionalEmbedding",
    "SmallViT",
    "TokenMeanPool",
    "TransformerBlock",
]


class PatchEmbedding(nn.Module):
    """Non-overlapping patches to tokens: ``(B, C, H, W) -> (B, T, D)``.

    ``proj = Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)`` followed
    by flattening the spatial grid in row-major order, so ``T = (image_size/patch_size)²``
    (16 for 28/7). Parameters: ``in_channels·patch_size²·dim + dim`` (3,200 by default).
    """

    def __init__(
        self, image_size: int = 28, patch_size: int = 7, in_channels: int = 1, dim: int = 64
    ) -> None:
        super().__init__()
        for name, v in (
            ("image_size", image_size),
            ("patch_size", patch_size),
            ("in_channels", in_channels),
            ("dim", dim),
        ):
            check_positive_int(v, name)
        if image_size % patch_size != 0:
            raise ValueError(
                f"image_size ({image_size}) must be divisible by patch_size ({patch_size}); "
                f"divisors of {image_size}: {[d for d in range(1, image_size + 1) if image_size % d == 0]}"
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.n_tokens = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, T, D)``."""
        return self.proj(x).flatten(2).transpose(1, 2)


class PositionalEmbedding(nn.Module):
    """Adds a learned position table: ``(B, T, D) -> (B, T, D)``, ``x + weight``.

    ``weight`` is an ``nn.Parameter`` of shape ``(1, T, D)`` (``T·D`` parameters, 1,024 by
    default), initialised N(0, 0.02²). A deterministic shift: it moves means only.
    """

    def __init__(self, n_tokens: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, T, D)`` plus the learned position table ``(1, T, D)``; cost O(B·T·D)."""
        return x + self.weight


class TokenMeanPool(nn.Module):
    """Mean over the token axis: ``(B, T, D) -> (B, D)`` (used instead of a class token)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, D)``: the mean over the T tokens."""
        return x.mean(dim=1)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention from four explicit ``nn.Linear(dim, dim)`` layers.

    For tokens ``x`` ``(B, T, D)`` and ``H`` heads of width ``d = D/H``::

        q, k, v = split_heads(q_proj(x)), split_heads(k_proj(x)), split_heads(v_proj(x))  # (B,H,T,d)
        A = softmax(q kᵀ / sqrt(d), dim=-1)                                                 # (B,H,T,T)
        out = out_proj(merge_heads(A v))                                                    # (B,T,D)

    No masking, no dropout. Parameters: ``4·(D² + D)`` (16,640 for D = 64).
    """

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(n_heads, "n_heads")
        if dim % n_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
        self.dim = dim
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, H, T, D/H)``; head ``h`` takes features ``h·d … (h+1)·d − 1``."""
        b, t, _ = x.shape
        return x.reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`split_heads`: ``(B, H, T, d) -> (B, T, H·d)``."""
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, h * d)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head queries, keys and values, each ``(B, H, T, D/H)``, for tokens ``(B, T, D)``."""
        return (
            self.split_heads(self.q_proj(x)),
            self.split_heads(self.k_proj(x)),
            self.split_heads(self.v_proj(x)),
        )

    def weights_from_qk(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``softmax(q kᵀ / sqrt(d))`` over the last axis: ``(B,H,T,d)² -> (B,H,T,T)``."""
        return torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Attention matrix ``(B, H, T, T)`` for tokens ``(B, T, D)``; each row sums to 1."""
        return self.weights_from_qk(self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        q, k, v = self.qkv(x)
        return self.out_proj(self.merge_heads(self.weights_from_qk(q, k) @ v))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block, ``(B, T, D) -> (B, T, D)``.

    It computes::

        x = x + attn(ln1(x))
        x = x + mlp(ln2(x)),   mlp = Sequential(fc1 Linear(D, r·D), act GELU, fc2 Linear(r·D, D))

    Parameters: ``4·D`` (two LayerNorms) ``+ 4·(D² + D)``
    (attention) ``+ 2·r·D² + r·D + D`` (MLP): 33,472 for D = 64, r = 2.
    """

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        check_positive_int(mlp_ratio, "mlp_ratio")
        hidden = mlp_ratio * dim
        self.ln1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, n_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("fc1", nn.Linear(dim, hidden)),
                    ("act", nn.GELU()),
                    ("fc2", nn.Linear(hidden, dim)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class SmallViT(nn.Module):
    """A small vision transformer; mean-pools the tokens instead of using a class token.

    Children, in forward order (``list(model.children())`` walks them)::

        patch_embed  PatchEmbedding          (B, C, 28, 28) -> (B, T, D)    T = (28/7)² = 16
        pos_embed    PositionalEmbedding     x + weight, weight (1, T, D)
        blocks       Sequential(block1 … block{depth}) of TransformerBlock
        norm         LayerNorm(D), per token
        pool         TokenMeanPool           (B, T, D) -> (B, D)
        head         Linear(D, n_classes)    logits (B, n_classes)

    With the defaults it has 71,946 parameters: patch embedding 3,200, positions 1,024,
    two blocks of 33,472, final norm 128, head 650.

    Raises ``ValueError`` if ``image_size`` is not divisible by ``patch_size`` or ``dim`` by
    ``n_heads``.
    """

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 7,
        in_channels: int = 1,
        dim: int = 64,
        depth: int = 2,
        n_heads: int = 4,
        mlp_ratio: int = 2,
        n_classes: int = 10,
    ) -> None:
        super().__init__()
        check_positive_int(depth, "depth")
        check_positive_int(n_classes, "n_classes")
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.dim = dim
        self.n_classes = n_classes
        self.patch_embed = PatchEmbedding(image_size, patch_size, in_channels, dim)
        self.n_tokens = self.patch_embed.n_tokens
        self.pos_embed = PositionalEmbedding(self.n_tokens, dim)
        self.blocks = nn.Sequential(
            OrderedDict((f"block{i + 1}", TransformerBlock(dim, n_heads, mlp_ratio)) for i in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.pool = TokenMeanPool()
        self.head = nn.Linear(dim, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, D)`` for images ``(B, C, H, W)``."""
        return self.pool(self.norm(self.blocks(self.pos_embed(self.patch_embed(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)`` for images ``(B, in_channels, image_size, image_size)``."""
        return self.head(self.features(x))
