"""Gaussian predictive over outputs: N(mean (B,C), cov (B,C,C) or var (B,C))."""

from __future__ import annotations

import math

import torch

from posthoc.predictive import links
from posthoc.predictive.base import Predictive, check_n_samples, parse_link
from posthoc.predictive.links import LinkApprox
from posthoc.utils.checks import check_finite, check_positive


class GaussianPredictive(Predictive):
    """f(x) ~ N(mean, Sigma) for each of B inputs.

    Args:
        mean: (B, C) predictive mean (logits for classification).
        cov: (B, C, C) full covariance, or
        var: (B, C) marginal variances (a diagonal covariance). Give exactly one.
            A zero variance is allowed (e.g. the MAP predictive).
        link_approx: the link :meth:`probs` uses when none is given (default "probit"; a Laplace's glm
            predictive gets the Laplace's ``default_link_approx``, the link of ``la(x)``).

    Full covariances are checked to be symmetric (relative 1e-6); positive
    semi-definiteness is checked where it is used (sampling, log-determinant).
    """

    def __init__(
        self,
        mean: torch.Tensor,
        cov: torch.Tensor | None = None,
        var: torch.Tensor | None = None,
        *,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
    ) -> None:
        self.link_approx = parse_link(link_approx)
        self._cov: torch.Tensor | None
        # The covariance (B, C, C) or the variances (B, C), whichever was given: what the links take.
        self._cov_or_var: torch.Tensor
        if (cov is None) == (var is None):
            raise ValueError("give exactly one of cov (B, C, C) or var (B, C)")
        if not isinstance(mean, torch.Tensor) or mean.ndim != 2:
            shape = tuple(mean.shape) if isinstance(mean, torch.Tensor) else type(mean).__name__
            raise ValueError(f"mean must be a tensor of shape (B, C), got {shape}")
        check_finite(mean, "mean")
        batch, n_out = mean.shape
        if cov is not None:
            if cov.shape != (batch, n_out, n_out):
                raise ValueError(f"cov must have shape {(batch, n_out, n_out)}, got {tuple(cov.shape)}")
            check_finite(cov, "cov")
            asym = (cov - cov.transpose(-1, -2)).abs().amax() if cov.numel() else 0.0
            if float(asym) > 1e-6 * max(float(cov.abs().amax()) if cov.numel() else 0.0, 1e-30):
                raise ValueError("cov must be symmetric in its last two dimensions")
            if bool((torch.diagonal(cov, dim1=-2, dim2=-1) < 0).any()):
                raise ValueError("cov has negative diagonal entries: not a covariance")
            self._cov = self._cov_or_var = cov.to(mean.dtype)
        else:
            assert var is not None
            if var.shape != (batch, n_out):
                raise ValueError(f"var must have shape {(batch, n_out)}, got {tuple(var.shape)}")
            check_finite(var, "var")
            if bool((var < 0).any()):
                raise ValueError("var has negative entries: variances must be >= 0")
            self._cov, self._cov_or_var = None, var.to(mean.dtype)
        self._mean = mean

    @property
    def mean(self) -> torch.Tensor:
        """Predictive mean (B, C), as given."""
        return self._mean

    @property
    def var(self) -> torch.Tensor:
        """Marginal variances (B, C): as given, or the covariance's diagonal (a view, no copy)."""
        if self._cov is not None:
            return torch.diagonal(self._cov, dim1=-2, dim2=-1)
        return self._cov_or_var

    @property
    def cov(self) -> torch.Tensor:
        """Covariance (B, C, C): as given, or ``diag_embed(var)`` (allocates B·C² when only variances are known)."""
        if self._cov is not None:
            return self._cov
        return torch.diag_embed(self._cov_or_var)

    @property
    def has_full_cov(self) -> bool:
        """Whether cross-output covariances are known (else only the diagonal)."""
        return self._cov is not None

    def probs(
        self,
        link_approx: LinkApprox | str | None = None,
        n_samples: int = 1000,
        seed: int = 0,
        bridge_correction: bool = True,
    ) -> torch.Tensor:
        """Class probabilities (B, C) by the chosen link approximation.

        ``link_approx`` None: this predictive's ``link_approx`` ("probit", or a Laplace glm predictive's
        ``la.default_link_approx``, "probit_centred", which it replaced there: a FutureWarning says so when the
        two differ for these inputs' variances). ``n_samples`` and ``seed`` are used by ``"mc"`` only;
        ``bridge_correction`` by ``"bridge"`` only (see :func:`posthoc.predictive.links.bridge_alpha`).
        """
        if link_approx is None:
            link_approx = self.link_approx
            links.warn_changed_default(self.link_approx, self._cov_or_var)
        link = parse_link(link_approx)
        if link is LinkApprox.PROBIT:
            return links.probit(self.mean, self._cov_or_var)
        if link is LinkApprox.PROBIT_CENTRED:
            return links.probit_centred(self.mean, self._cov_or_var)
        if link is LinkApprox.BRIDGE:
            return links.laplace_bridge(self.mean, self._cov_or_var, correction=bridge_correction)
        check_n_samples(n_samples)
        generator = links.make_generator(seed, self.mean.device)
        return links.mc_probs(self.mean, self._cov_or_var, n_samples, generator)

    def sample(self, n_samples: int, seed: int = 0) -> torch.Tensor:
        """Draw ``n_samples`` outputs (S, B, C) from N(mean, Sigma), seeded by ``seed``.

        Cost: one Cholesky per input (O(B·C³)) with a full covariance, O(S·B·C) with variances.

        Raises:
            ValueError: If ``n_samples`` is not a positive int.
        """
        check_n_samples(n_samples)
        generator = links.make_generator(seed, self.mean.device)
        return links.sample_gaussian(self.mean, self._cov_or_var, n_samples, generator)

    def with_noise(self, sigma_noise: float | torch.Tensor) -> "GaussianPredictive":
        """N(mean, Sigma + sigma_noise^2 I): the predictive of y for regression."""
        check_positive(sigma_noise, "sigma_noise")
        noise_var = torch.as_tensor(sigma_noise, dtype=self.mean.dtype, device=self.mean.device) ** 2
        if self._cov is None:
            return GaussianPredictive(self.mean, var=self._cov_or_var + noise_var, link_approx=self.link_approx)
        eye = torch.eye(self.n_outputs, dtype=self.mean.dtype, device=self.mean.device)
        return GaussianPredictive(self.mean, cov=self._cov + noise_var * eye, link_approx=self.link_approx)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Log N(y; mean, Sigma) per input (B,) for targets ``y`` (B, C). Call on ``with_noise(sigma)`` for y.

        Cost: O(B·C) with variances, one Cholesky per input (O(B·C³)) with a full covariance.

        Raises:
            ValueError: Where Sigma is singular (a noise-free predictive) or ``y`` has the wrong shape.
        """
        y = self._check_targets(y)
        resid = y - self.mean
        if self._cov is None:
            var = self._cov_or_var
            if bool((var <= 0).any()):
                raise ValueError("log_prob needs positive variances; add observation noise with with_noise(sigma)")
            return -0.5 * (resid**2 / var + torch.log(2 * math.pi * var)).sum(-1)
        chol, info = torch.linalg.cholesky_ex(self._cov)
        if bool((info != 0).any()):
            raise ValueError("log_prob needs a positive definite covariance; add noise with with_noise(sigma)")
        white = torch.linalg.solve_triangular(chol, resid.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        return -0.5 * ((white**2).sum(-1) + logdet + self.n_outputs * math.log(2 * math.pi))

    def to(self, *args, **kwargs) -> "GaussianPredictive":
        """A copy with tensors moved/cast like ``torch.Tensor.to``."""
        mean = self.mean.to(*args, **kwargs)
        if self._cov is not None:
            return GaussianPredictive(mean, cov=self._cov.to(*args, **kwargs), link_approx=self.link_approx)
        return GaussianPredictive(mean, var=self._cov_or_var.to(*args, **kwargs), link_approx=self.link_approx)

    def __repr__(self) -> str:
        kind = "cov" if self._cov is not None else "var"
        return f"GaussianPredictive(B={len(self)}, C={self.n_outputs}, {kind}, dtype={self.mean.dtype})"
