"""Link approximations: class probabilities from a Gaussian over logits.

All functions take ``mean`` of shape (B, C) and a covariance, either full
``cov`` (B, C, C) or its diagonal ``var`` (B, C), and return probabilities
(B, C). Formulas and notation: see docs/laplace.md.
"""

from __future__ import annotations

import math
import warnings
from enum import Enum

import torch


class LinkApprox(str, Enum):
    """How to turn a Gaussian over logits into class probabilities."""

    PROBIT = "probit"  # softmax(mu / sqrt(1 + pi/8 var)); O(BC); laplace-torch's probit
    BRIDGE = "bridge"  # Laplace bridge to a Dirichlet; O(BC^2) with a full cov
    MC = "mc"  # Monte Carlo average of softmax over logit samples; O(SBC + BC^3)
    PROBIT_CENTRED = "probit_centred"  # probit of the zero-sum projection (P mu, P Sigma P); O(BC^2)


def warn_changed_default(link: LinkApprox, cov_or_var: torch.Tensor) -> None:
    """FutureWarning for ``probs()`` without a link where its default is no longer "probit".

    Until issue 17, every ``GaussianPredictive.probs()`` defaulted to "probit"; a Laplace's glm predictive now
    defaults to ``la.default_link_approx`` ("probit_centred", the link of ``la(x)``). Warns when ``link`` is not
    "probit" and some variance in ``cov_or_var`` ((B, C, C) or (B, C)) is nonzero (with none the two links
    agree: both are the softmax of the mean). Cost: one pass over ``cov_or_var``.
    """
    if link is LinkApprox.PROBIT or not bool((cov_or_var != 0).any()):
        return
    warnings.warn(f"probs() without link_approx uses this predictive's default link {link.value!r} (for a Laplace: "
                  "la(x)'s link), no longer 'probit' as before; pass link_approx='probit' for the old "
                  f"probabilities, or link_approx={link.value!r} to keep the new ones without this warning",
                  FutureWarning, stacklevel=3)


def diagonal(cov_or_var: torch.Tensor) -> torch.Tensor:
    """The variances (B, C) of a full (B, C, C) or diagonal (B, C) covariance."""
    if cov_or_var.ndim == 3:
        return torch.diagonal(cov_or_var, dim1=-2, dim2=-1)
    return cov_or_var


def probit(mean: torch.Tensor, cov_or_var: torch.Tensor) -> torch.Tensor:
    """Probit (mean-field) approximation: softmax(mu_c / sqrt(1 + pi/8 Sigma_cc)).

    Uses the diagonal of the covariance only. Cost O(BC).
    """
    kappa = torch.rsqrt(1.0 + math.pi / 8.0 * diagonal(cov_or_var))
    return torch.softmax(mean * kappa, dim=-1)


def centred_variances(cov_or_var: torch.Tensor) -> torch.Tensor:
    """The variances (B, C) of P f for f with covariance Sigma, where P = I - 11^T/C removes the mean over classes.

    diag(P Sigma P)_k = Sigma_kk - 2 mean_j Sigma_kj + mean_jl Sigma_jl for a full (B, C, C) covariance;
    v_k (1 - 2/C) + sum(v) / C^2 for variances v (B, C). Softmax ignores the component of f along 1 (every
    logit shifted together), so these are the variances that change the class probabilities. Cost O(BC^2).
    """
    if cov_or_var.ndim == 3:
        centred = cov_or_var - cov_or_var.mean(dim=-1, keepdim=True)
        centred = centred - centred.mean(dim=-2, keepdim=True)
        # round-off can leave -eps where the variance is zero (a covariance that is all along 1)
        return torch.diagonal(centred, dim1=-2, dim2=-1).clamp_min(0)
    n_classes = cov_or_var.shape[-1]
    return cov_or_var * (1.0 - 2.0 / n_classes) + cov_or_var.sum(-1, keepdim=True) / n_classes**2


def probit_centred(mean: torch.Tensor, cov_or_var: torch.Tensor) -> torch.Tensor:
    """Probit of the centred logits: softmax(m_c / sqrt(1 + pi/8 (P Sigma P)_cc)), m = P mu, P = I - 11^T/C.

    softmax(f) = softmax(P f) exactly, and P f ~ N(P mu, P Sigma P): the probit applied after this projection
    ignores the variance along 1 (all logits shifted together), which :func:`probit` counts as uncertainty
    although it leaves the probabilities unchanged. Equal to :func:`probit` when mu sums to zero and
    Sigma 1 = 0; invariant to mu + c 1 and Sigma + c 11^T. A diagonal input (B, C) is read as diag(v).
    Cost O(BC^2) (O(BC) for variances).
    """
    return probit(centred_mean(mean), centred_variances(cov_or_var))


def centred_mean(mean: torch.Tensor) -> torch.Tensor:
    """P mu (B, C): the logits minus their mean over classes (softmax unchanged)."""
    # mean / C summed, not mean(): the sum of huge logits may overflow where the average does not
    return mean - (mean / mean.shape[-1]).sum(dim=-1, keepdim=True)


def _bridge_log_alpha(mean: torch.Tensor, cov_or_var: torch.Tensor, correction: bool) -> torch.Tensor:
    """Log alpha (B, C) of the Laplace bridge, finite for any finite mean and positive variances.

    In log space, log alpha_k = logaddexp(log(1 - 2/C), mu_k + logsumexp(-mu) - 2 log C) - log Sigma_kk,
    so no exponential overflows (float32 e^{mu} overflows beyond mu = 88). The covariance is divided
    by its largest diagonal entry s before the projection (and log s added back), so sums of huge
    variances do not overflow either. A log alpha too large for the dtype (logit differences beyond
    its range) is clamped to the dtype's maximum: that class then holds all the probability, as in probit.
    """
    n_classes = mean.shape[-1]
    scale = diagonal(cov_or_var).abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(mean.dtype).tiny)
    if correction:
        # mean / C summed, not mean(): the sum of huge logits may overflow where the average does not
        mean = mean - (mean / n_classes).sum(dim=-1, keepdim=True)
        var = centred_variances(cov_or_var / (scale.unsqueeze(-1) if cov_or_var.ndim == 3 else scale))
    else:
        var = diagonal(cov_or_var) / scale
    if bool((var <= 0).any()):
        raise ValueError(
            "the Laplace bridge needs strictly positive logit variances; got a zero or negative "
            "variance (e.g. a MAP predictive with no uncertainty). Use link_approx='probit' or 'mc' instead"
        )
    log_var = torch.log(var) + torch.log(scale)
    exponent = mean + torch.logsumexp(-mean, dim=-1, keepdim=True) - 2.0 * math.log(n_classes)
    # log(1 - 2/C) is -inf for C = 2, where logaddexp(-inf, b) = b; C = 1 is handled by the callers
    constant = torch.full_like(exponent, math.log(1.0 - 2.0 / n_classes) if n_classes > 2 else -math.inf)
    return (torch.logaddexp(constant, exponent) - log_var).clamp(max=torch.finfo(mean.dtype).max)


def bridge_alpha(mean: torch.Tensor, cov_or_var: torch.Tensor, correction: bool = True) -> torch.Tensor:
    """Dirichlet concentrations alpha (B, C) of the Laplace bridge.

    alpha_k = (1 - 2/C + e^{mu_k} sum_l e^{-mu_l} / C^2) / Sigma_kk.

    With ``correction`` (the default), mu and Sigma are first projected onto the
    zero-sum subspace (mu - mean(mu), P Sigma P with P = I - 11^T/C), which makes
    the result invariant to adding the same random offset to every logit, as
    softmax is. Without it, the formula is applied to mu and diag(Sigma) as given.
    Computed in log space; alpha itself is inf where it exceeds the dtype's range
    (use :func:`laplace_bridge` for the probabilities, which stay finite).
    Needs C >= 2. Raises ValueError when a (projected) variance is not positive:
    the bridge is undefined at zero variance.
    """
    if mean.shape[-1] < 2:
        raise ValueError("the Laplace bridge needs at least 2 classes")
    return torch.exp(_bridge_log_alpha(mean, cov_or_var, correction))


def laplace_bridge(mean: torch.Tensor, cov_or_var: torch.Tensor, correction: bool = True) -> torch.Tensor:
    """Predictive probabilities alpha_k / sum_l alpha_l of the Laplace bridge. Cost O(BC^2).

    Computed as softmax(log alpha), so the probabilities are finite and sum to 1 for any finite
    mean and positive, finite variances (float32 logit gaps of 90 and more included); one class
    gives probability 1. Raises ValueError at zero variance (see :func:`bridge_alpha`).
    """
    if mean.shape[-1] == 1:
        return torch.ones_like(mean)
    return torch.softmax(_bridge_log_alpha(mean, cov_or_var, correction), dim=-1)


def covariance_sqrt(cov_or_var: torch.Tensor) -> torch.Tensor:
    """A matrix L (B, C, C) with L L^T = Sigma, for sampling.

    A diagonal input gives diag(sqrt(var)). A positive definite covariance
    gives its Cholesky factor (so a diagonal covariance given in full draws the
    same samples as its diagonal). A singular one (PSD, e.g. rank-deficient GGN
    predictives) needs a symmetric eigendecomposition instead; eigenvalues below
    -1e-6 * max|eigenvalue| mean the input is not a covariance and raise
    ValueError. Cost O(BC^3).
    """
    if cov_or_var.ndim == 2:
        return torch.diag_embed(cov_or_var.clamp_min(0).sqrt())
    chol, info = torch.linalg.cholesky_ex(cov_or_var)
    if not bool((info != 0).any()):
        return chol
    evals, evecs = torch.linalg.eigh(cov_or_var)
    scale = evals.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(evals.dtype).tiny)
    if bool((evals < -1e-6 * scale).any()):
        raise ValueError("covariance is not positive semi-definite (a clearly negative eigenvalue)")
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)


def sample_gaussian(
    mean: torch.Tensor, cov_or_var: torch.Tensor, n_samples: int, generator: torch.Generator
) -> torch.Tensor:
    """Draw (S, B, C) samples of N(mean, Sigma) with the given generator."""
    noise = torch.randn(
        (n_samples, *mean.shape), generator=generator, dtype=mean.dtype, device=mean.device
    )
    if cov_or_var.ndim == 2:
        return mean + noise * cov_or_var.clamp_min(0).sqrt()
    root = covariance_sqrt(cov_or_var)
    return mean + torch.einsum("bij,sbj->sbi", root, noise)


def mc_probs(
    mean: torch.Tensor, cov_or_var: torch.Tensor, n_samples: int, generator: torch.Generator
) -> torch.Tensor:
    """Monte Carlo estimate of E[softmax(f)], f ~ N(mean, Sigma). Cost O(SBC + BC^3)."""
    return torch.softmax(sample_gaussian(mean, cov_or_var, n_samples, generator), dim=-1).mean(0)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded with ``seed`` (so MC links are reproducible)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator
