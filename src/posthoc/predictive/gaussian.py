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
        cov_factor: (B, C, R), with ``var``: the covariance F Fᵀ + diag(var), kept in that form (a low-rank
            term plus a diagonal, as torch.distributions.LowRankMultivariateNormal). Worth it where R < C: the
            probit links, sampling and the variances cost O(B·C·R) instead of the O(B·C²·R) of forming the
            (B, C, C) matrix, which :attr:`cov` builds only when read (e.g. a 1,000-class head on 512 features).
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
        cov_factor: torch.Tensor | None = None,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
    ) -> None:
        self.link_approx = parse_link(link_approx)
        self._factor: torch.Tensor | None = None
        self._diag: torch.Tensor  # d of F Fᵀ + diag(d), set with a cov_factor only
        self._dense: torch.Tensor | None = None  # the factored covariance formed, once read through .cov
        self._cov: torch.Tensor | None
        # The covariance (B, C, C) or the variances (B, C), whichever was given: what the links take.
        self._cov_or_var: torch.Tensor
        if (cov is None) == (var is None):
            raise ValueError("give exactly one of cov (B, C, C) or var (B, C)")
        if cov_factor is not None and var is None:
            raise ValueError("cov_factor needs var= (the diagonal of F Fᵀ + diag(var)), not cov=")
        if not isinstance(mean, torch.Tensor) or mean.ndim != 2:
            shape = tuple(mean.shape) if isinstance(mean, torch.Tensor) else type(mean).__name__
            raise ValueError(f"mean must be a tensor of shape (B, C), got {shape}")
        check_finite(mean, "mean")
        batch, n_out = mean.shape
        if cov is not None:
            if cov.shape != (batch, n_out, n_out):
                raise ValueError(f"cov must have shape {(batch, n_out, n_out)}, got {tuple(cov.shape)}")
            check_finite(cov, "cov")
            if not torch.equal(cov, cov.transpose(-1, -2)):  # exact symmetry (e.g. a symmetrised cov): one pass
                asym = (cov - cov.transpose(-1, -2)).abs().amax()
                if float(asym) > 1e-6 * max(float(cov.abs().amax()), 1e-30):
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
            if cov_factor is not None:
                if cov_factor.ndim != 3 or cov_factor.shape[:2] != (batch, n_out):
                    raise ValueError(f"cov_factor must have shape ({batch}, {n_out}, R), got {tuple(cov_factor.shape)}")
                self._factor = check_finite(cov_factor, "cov_factor").to(mean.dtype)
                self._diag = self._cov_or_var
                # the marginal variances (what the diagonal links read): the diagonal plus the factor's row norms
                self._cov_or_var = self._diag + self._factor.square().sum(-1)
        self._mean = mean

    @property
    def mean(self) -> torch.Tensor:
        """Predictive mean (B, C), as given."""
        return self._mean

    @property
    def var(self) -> torch.Tensor:
        """Marginal variances (B, C): as given, the covariance's diagonal (a view) or var + F's row norms.

        With a ``cov_factor`` F the row norms were added once, at construction.
        """
        if self._cov is not None:
            return torch.diagonal(self._cov, dim1=-2, dim2=-1)
        return self._cov_or_var

    @property
    def cov(self) -> torch.Tensor:
        """Covariance (B, C, C): as given, F Fᵀ + diag(var), or ``diag_embed(var)``.

        With a ``cov_factor`` the matrix is formed on the first read (O(B·C²·R)) and kept; with variances only,
        each read allocates B·C².
        """
        if self._cov is not None:
            return self._cov
        if self._factor is not None:
            if self._dense is None:
                self._dense = torch.baddbmm(torch.diag_embed(self._diag), self._factor, self._factor.transpose(1, 2))
            return self._dense
        return torch.diag_embed(self._cov_or_var)

    @property
    def cov_factor(self) -> torch.Tensor | None:
        """F (B, C, R) of a covariance given as F Fᵀ + diag(d), else None."""
        return self._factor

    @property
    def cov_diag(self) -> torch.Tensor | None:
        """The diagonal part d (B, C) of a covariance given as F Fᵀ + diag(d) (``cov_factor``), else None."""
        return self._diag if self._factor is not None else None

    @property
    def has_full_cov(self) -> bool:
        """Whether cross-output covariances are known (else only the diagonal): a full or factored covariance."""
        return self._cov is not None or self._factor is not None

    def _centred_variances(self) -> torch.Tensor:
        """diag(P Σ P) (B, C), P = I - 11ᵀ/C; with a factor O(B·C·R): P F's row norms plus the diagonal's part."""
        if self._factor is None:
            return links.centred_variances(self._cov_or_var)
        centred_factor = self._factor - self._factor.mean(dim=-2, keepdim=True)
        return links.centred_variances(self._diag) + centred_factor.square().sum(-1)

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
            return links.probit(links.centred_mean(self.mean), self._centred_variances())
        if link is LinkApprox.BRIDGE:
            return links.laplace_bridge(self.mean, self._cov_or_var if self._factor is None else self.cov,
                                        correction=bridge_correction)
        check_n_samples(n_samples)
        return torch.softmax(self.sample(n_samples, seed), dim=-1).mean(0)

    def sample(self, n_samples: int, seed: int = 0) -> torch.Tensor:
        """Draw ``n_samples`` outputs (S, B, C) from N(mean, Sigma), seeded by ``seed``.

        Cost: one Cholesky per input (O(B·C³)) with a full covariance, O(S·B·C) with variances.

        Raises:
            ValueError: If ``n_samples`` is not a positive int.
        """
        check_n_samples(n_samples)
        generator = links.make_generator(seed, self.mean.device)
        if self._factor is None:
            return links.sample_gaussian(self.mean, self._cov_or_var, n_samples, generator)
        # F z + sqrt(d) e with z ~ N(0, I_R), e ~ N(0, I_C): covariance F Fᵀ + diag(d), O(S·B·C·R)
        low_rank = torch.randn((n_samples, *self._factor.shape[::2]), generator=generator, dtype=self.mean.dtype,
                               device=self.mean.device)
        return links.sample_gaussian(self.mean, self._diag, n_samples, generator) \
            + torch.einsum("bcr,sbr->sbc", self._factor, low_rank)

    def with_noise(self, sigma_noise: float | torch.Tensor) -> "GaussianPredictive":
        """N(mean, Sigma + diag(sigma_noise^2)): the predictive of y for regression.

        ``sigma_noise``: a scalar, (C,) per output, (B, 1) per input or (B, C); anything else that does not
        broadcast to the outputs (B, C) raises ValueError (every covariance form adds the same variances).
        """
        check_positive(sigma_noise, "sigma_noise")
        noise_var = torch.as_tensor(sigma_noise, dtype=self.mean.dtype, device=self.mean.device) ** 2
        try:
            per_entry = torch.broadcast_to(noise_var, self.mean.shape)
        except RuntimeError:
            raise ValueError(f"sigma_noise of shape {tuple(noise_var.shape)} does not broadcast to the outputs (B, C) = "
                             f"{tuple(self.mean.shape)}: give a scalar, (C,) per output, (B, 1) per input or "
                             "(B, C)") from None
        if self._factor is not None:
            return GaussianPredictive(self.mean, var=self._diag + per_entry, cov_factor=self._factor,
                                      link_approx=self.link_approx)
        if self._cov is None:
            return GaussianPredictive(self.mean, var=self._cov_or_var + per_entry, link_approx=self.link_approx)
        return GaussianPredictive(self.mean, cov=self._cov + torch.diag_embed(per_entry), link_approx=self.link_approx)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Log N(y; mean, Sigma) per input (B,) for targets ``y`` (B, C). Call on ``with_noise(sigma)`` for y.

        Cost: O(B·C) with variances, one Cholesky per input (O(B·C³)) with a full covariance.

        Raises:
            ValueError: Where Sigma is singular (a noise-free predictive) or ``y`` has the wrong shape.
        """
        y = self._check_targets(y)
        resid = y - self.mean
        if self._cov is None and self._factor is None:
            var = self._cov_or_var
            if bool((var <= 0).any()):
                raise ValueError("log_prob needs positive variances; add observation noise with with_noise(sigma)")
            return -0.5 * (resid**2 / var + torch.log(2 * math.pi * var)).sum(-1)
        chol, info = torch.linalg.cholesky_ex(self.cov)
        if bool((info != 0).any()):
            raise ValueError("log_prob needs a positive definite covariance; add noise with with_noise(sigma)")
        white = torch.linalg.solve_triangular(chol, resid.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        return -0.5 * ((white**2).sum(-1) + logdet + self.n_outputs * math.log(2 * math.pi))

    def to(self, *args, **kwargs) -> "GaussianPredictive":
        """A copy with tensors moved/cast like ``torch.Tensor.to``."""
        mean = self.mean.to(*args, **kwargs)
        if self._factor is not None:
            return GaussianPredictive(mean, var=self._diag.to(*args, **kwargs),
                                      cov_factor=self._factor.to(*args, **kwargs), link_approx=self.link_approx)
        if self._cov is not None:
            return GaussianPredictive(mean, cov=self._cov.to(*args, **kwargs), link_approx=self.link_approx)
        return GaussianPredictive(mean, var=self._cov_or_var.to(*args, **kwargs), link_approx=self.link_approx)

    def __repr__(self) -> str:
        kind = "cov" if self._cov is not None else f"cov_factor R={self._factor.shape[-1]}" \
            if self._factor is not None else "var"
        return f"GaussianPredictive(B={len(self)}, C={self.n_outputs}, {kind}, dtype={self.mean.dtype})"
