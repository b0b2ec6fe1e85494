"""Output factors and log-likelihood of independent Bernoulli outputs (``Likelihood.BINARY``).

Outputs f (B, K) are logits, y_k ~ Bernoulli(p_k), p = sigmoid(f), targets (B, K) in {0, 1}. The Hessian of
-log p(y | f) = BCE-with-logits in f is Gamma = diag(p (1 - p)): diagonal, so its root is diagonal too and the
exact GGN costs K backward passes per example (K output-factor columns), as many as the outputs.
"""

from __future__ import annotations

import math

import torch


def bernoulli_ggn_factor(logits: torch.Tensor) -> torch.Tensor:
    """S (B, K, K) = diag(sqrt(p (1 - p))), S S^T = Gamma exactly, for logits (B, K). Cost O(B K^2) memory."""
    p = torch.sigmoid(logits)
    return torch.diag_embed((p * (1 - p)).sqrt())


def bernoulli_ef_factor(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """S (B, K, 1) = sigmoid(f) - y, the gradient of BCE-with-logits in f (the empirical Fisher's column)."""
    return (torch.sigmoid(logits) - targets.reshape(logits.shape).to(logits.dtype)).unsqueeze(-1)


def bernoulli_mc_factor(logits: torch.Tensor, mc_samples: int, generator: torch.Generator) -> torch.Tensor:
    """S (B, K, M) = (p - y_hat_m) / sqrt(M) for M labels y_hat ~ Bernoulli(p) drawn per output.

    E[(p - y_hat)(p - y_hat)^T] = diag(p (1 - p)) = Gamma (the outputs are independent), so S S^T is unbiased
    for Gamma. The draws use ``generator`` (a CPU generator; moved to the logits' device).
    """
    p = torch.sigmoid(logits)
    uniform = torch.rand((*p.shape, mc_samples), generator=generator, dtype=p.dtype).to(p.device)
    draws = (uniform < p.unsqueeze(-1)).to(p.dtype)  # (B, K, M)
    return (p.unsqueeze(-1) - draws) / math.sqrt(mc_samples)


def bernoulli_log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum_n sum_k log p(y_nk | f_nk) = -BCE-with-logits summed, 0-d, for logits and targets (B, K)."""
    return -torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets.reshape(logits.shape).to(logits.dtype), reduction="sum")
