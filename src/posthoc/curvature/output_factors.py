"""Output-space factors S_n (C, K) with H = sum_n J_n^T S_n S_n^T J_n.

- GGN (exact): S_n S_n^T = Gamma_n, the Hessian of -log p(y | f) in f.
  Classification: Gamma = diag(p) - p p^T has rank C - 1, so S has K = C - 1 columns
  (one backward pass fewer per example than the C-column root; see _softmax_hessian_factor).
  Regression: Gamma = sigma^-2 I, stored at sigma = 1: S = I (K = C).
  Binary (independent Bernoulli outputs): Gamma = diag(p (1 - p)), S diagonal (K = C); see
  :mod:`posthoc.curvature.bernoulli`.
- GGN_MC (Monte-Carlo GGN / Fisher with sampled labels): S_n = gradient in f of
  -log p(y_hat | f) for y_hat drawn from the model's predictive, divided by
  sqrt(M) for M samples (K = M); unbiased for Gamma_n.
- EF (empirical Fisher): S_n = gradient in f of -log p(y_n | f) (K = 1).

Regression curvature is stored at sigma_noise = 1 and rescaled later:
GGN and GGN_MC scale as sigma^-2, EF as sigma^-4 (see :meth:`OutputFactors.scale`).
"""

from __future__ import annotations

import math
import warnings
from enum import Enum
from typing import Any

import torch

from posthoc.curvature.bernoulli import (
    bernoulli_ef_factor,
    bernoulli_ggn_factor,
    bernoulli_log_likelihood,
    bernoulli_mc_factor,
)
from posthoc.likelihood import Likelihood
from posthoc.utils.checks import check_choice


class CurvatureType(str, Enum):
    """Which curvature S Sᵀ stands for: the GGN (exact), its Monte Carlo estimate, or the empirical Fisher."""

    GGN = "ggn"
    GGN_MC = "ggn_mc"
    EF = "ef"


class OutputFactors:
    """Computes S (B, C, K) from outputs and targets for one likelihood and curvature type.

    ``generator`` seeds the label sampling of GGN_MC (``mc_samples`` labels per example).
    """

    def __init__(
        self,
        likelihood: Likelihood | str,
        curvature: CurvatureType | str = CurvatureType.GGN,
        mc_samples: int = 1,
        seed: int = 0,
    ) -> None:
        self.likelihood = check_choice(likelihood, Likelihood, "likelihood")
        self.curvature = check_choice(curvature, CurvatureType, "curvature")
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        self.mc_samples = mc_samples
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """S (B, C, K) for outputs (B, C) (detached) and targets (B,) labels or (B, C) values."""
        f = outputs.detach()
        batch, n_out = f.shape
        if self.likelihood is Likelihood.BINARY:
            if self.curvature is CurvatureType.GGN:
                return bernoulli_ggn_factor(f)
            if self.curvature is CurvatureType.EF:
                return bernoulli_ef_factor(f, targets)
            return bernoulli_mc_factor(f, self.mc_samples, self.generator)
        if self.likelihood is Likelihood.CLASSIFICATION:
            p = torch.softmax(f, dim=-1)
            if self.curvature is CurvatureType.GGN:
                return _softmax_hessian_factor(p)
            if self.curvature is CurvatureType.EF:
                onehot = torch.nn.functional.one_hot(targets.long(), n_out).to(f.dtype)
                return (p - onehot).unsqueeze(-1)
            draws = torch.multinomial(p.cpu(), self.mc_samples, replacement=True, generator=self.generator)
            onehot = torch.nn.functional.one_hot(draws.to(f.device), n_out).to(f.dtype)  # (B, M, C)
            return (p.unsqueeze(1) - onehot).transpose(1, 2) / math.sqrt(self.mc_samples)
        if self.curvature is CurvatureType.GGN:
            return torch.eye(n_out, dtype=f.dtype, device=f.device).expand(batch, n_out, n_out)
        if self.curvature is CurvatureType.EF:
            return (f - targets.reshape(f.shape).to(f.dtype)).unsqueeze(-1)
        noise = torch.randn((batch, n_out, self.mc_samples), generator=self.generator, dtype=f.dtype)
        return noise.to(f.device) / math.sqrt(self.mc_samples)

    def scale(self, sigma_noise: torch.Tensor) -> torch.Tensor:
        """Factor multiplying the stored curvature at noise sigma (1 for classification and binary)."""
        if self.likelihood is not Likelihood.REGRESSION:
            return torch.ones_like(sigma_noise)
        power = 4 if self.curvature is CurvatureType.EF else 2
        return sigma_noise ** (-power)


MANY_CLASSES = 1000  # above this, the default curvature is the Monte Carlo GGN


def many_classes_default(factors: OutputFactors, n_outputs: int) -> OutputFactors:
    """The default curvature for C = ``n_outputs``: the exact GGN, or the Monte Carlo GGN above 1,000 classes.

    ``factors`` were built with the default curvature (the user chose none). Classification with more than
    1,000 classes gets ``OutputFactors(..., "ggn_mc")`` with the same samples per output and generator, said in a
    warning: the exact GGN costs C - 1 backward passes per output, the MC-GGN ``mc_samples``.
    """
    if (factors.likelihood is not Likelihood.CLASSIFICATION or n_outputs <= MANY_CLASSES
            or factors.curvature is not CurvatureType.GGN):
        return factors
    warnings.warn(f"{n_outputs} classes: the curvature defaults to the Monte Carlo GGN (curvature='ggn_mc', "
                  f"{factors.mc_samples} sampled label(s) per output), as the exact GGN costs C - 1 backward passes "
                  "per output; pass curvature='ggn' to keep the exact one", UserWarning, stacklevel=3)
    sampled = OutputFactors(factors.likelihood, CurvatureType.GGN_MC, mc_samples=factors.mc_samples)
    sampled.generator = factors.generator
    return sampled


class RecordingFactors:
    """OutputFactors that also sum the log-likelihood statistic of the outputs they see (while ``active``).

    So log p(D | theta*) costs no extra forward pass for structures that see every example once.

    ``n_seen`` counts the examples seen while active and ``stat`` sums :func:`log_likelihood_terms` over
    them (a 0-d tensor in the outputs' dtype); every other attribute is the wrapped factors'.
    """

    def __init__(self, factors: OutputFactors, likelihood: Likelihood) -> None:
        self.factors, self.likelihood = factors, likelihood
        self.active, self.n_seen, self.stat = False, 0, torch.zeros(())

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The wrapped factors' S (B, C, K), adding the batch's log-likelihood terms to ``stat`` while active."""
        if self.active:
            self.n_seen += outputs.shape[0]
            self.stat = self.stat.to(outputs.dtype) + log_likelihood_terms(outputs, targets, self.likelihood)
        return self.factors(outputs, targets)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.factors, name)


def _softmax_hessian_factor(p: torch.Tensor) -> torch.Tensor:
    """An exact rank-(C-1) factor S (B, C, C-1) with S S^T = diag(p) - p p^T.

    R = diag(sqrt p) - p sqrt(p)^T satisfies R R^T = Gamma and R sqrt(p) = 0. The
    Householder reflection Q with Q sqrt(p) = -e_j (j = argmax p, so the reflection
    vector sqrt(p) + e_j has norm >= sqrt 2 and is never ill-conditioned) is orthogonal,
    so (R Q)(R Q)^T = Gamma, and its column j is -R sqrt(p) = 0: dropping it loses nothing.
    """
    batch, n_out = p.shape
    sqrt_p = p.sqrt()
    root = torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)
    if n_out == 1:
        return root
    j = p.argmax(dim=-1)
    v = sqrt_p + torch.nn.functional.one_hot(j, n_out).to(p.dtype)
    # R Q = R - 2 (R v) v^T / (v^T v)
    rotated = root - 2 * (root @ v.unsqueeze(-1)) * v.unsqueeze(-2) / (v * v).sum(-1)[:, None, None]
    keep = torch.argsort((torch.arange(n_out, device=p.device) == j[:, None]).to(torch.int8), dim=-1, stable=True)
    return rotated.gather(2, keep[:, None, : n_out - 1].expand(batch, n_out, n_out - 1))


def log_likelihood_terms(outputs: torch.Tensor, targets: torch.Tensor, likelihood: Likelihood) -> torch.Tensor:
    """Sufficient statistic of log p(D | theta*) for a batch.

    Classification: sum_n log softmax(f_n)[y_n]. Binary: -BCE-with-logits summed. Regression: the sum of squared
    residuals sum_n ||y_n - f_n||^2 (the noise enters later, see
    :func:`log_likelihood`).
    """
    f = outputs.detach()
    if likelihood is Likelihood.CLASSIFICATION:
        return torch.log_softmax(f, -1).gather(-1, targets.long().reshape(-1, 1)).sum()
    if likelihood is Likelihood.BINARY:
        return bernoulli_log_likelihood(f, targets)
    return ((targets.reshape(f.shape).to(f.dtype) - f) ** 2).sum()


def log_likelihood(stat: torch.Tensor, n_outputs_total: int, likelihood: Likelihood,
                   sigma_noise: torch.Tensor) -> torch.Tensor:
    """Log p(D | theta*) from the accumulated statistic; ``n_outputs_total`` = N * C."""
    if likelihood is not Likelihood.REGRESSION:
        return stat
    return -0.5 * stat / sigma_noise**2 - 0.5 * n_outputs_total * torch.log(2 * math.pi * sigma_noise**2)
