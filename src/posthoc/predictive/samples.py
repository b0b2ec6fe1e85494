"""Sample-based predictive: S output samples (S, B, C), e.g. from weight samples."""

from __future__ import annotations

import math

import torch

from posthoc.predictive import links
from posthoc.predictive.base import Predictive, check_n_samples, parse_link
from posthoc.predictive.gaussian import GaussianPredictive
from posthoc.predictive.links import LinkApprox
from posthoc.utils.checks import check_finite, check_positive


class SamplePredictive(Predictive):
    """An empirical predictive from output samples f_s(x), s = 1..S.

    Args:
        samples: (S, B, C) outputs (logits for classification), S >= 2.
        sigma_noise: observation noise for regression; 0 means the predictive
            over f itself. Set it with :meth:`with_noise`.

    Moments use the unbiased (S - 1) normalisation. For regression with noise
    the predictive of y is the mixture (1/S) sum_s N(f_s, sigma^2 I).
    """

    def __init__(self, samples: torch.Tensor, sigma_noise: float | torch.Tensor = 0.0) -> None:
        if not isinstance(samples, torch.Tensor) or samples.ndim != 3:
            shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
            raise ValueError(f"samples must be a tensor of shape (S, B, C), got {shape}")
        if samples.shape[0] < 2:
            raise ValueError("a SamplePredictive needs at least 2 samples (S >= 2)")
        check_finite(samples, "samples")
        noise = torch.as_tensor(sigma_noise, dtype=samples.dtype, device=samples.device)
        if not bool(torch.isfinite(noise).all()) or bool((noise < 0).any()):
            raise ValueError(f"sigma_noise must be finite and >= 0, got {sigma_noise!r}")
        self.samples = samples
        self.sigma_noise = noise

    @property
    def n_samples(self) -> int:
        """The number S of stored samples."""
        return self.samples.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """Sample mean (B, C). Cost: O(S·B·C)."""
        return self.samples.mean(0)

    @property
    def var(self) -> torch.Tensor:
        """Unbiased sample variances plus ``sigma_noise²`` (B, C). Cost: O(S·B·C)."""
        return self.samples.var(0, unbiased=True) + self.sigma_noise**2

    @property
    def cov(self) -> torch.Tensor:
        """Unbiased sample covariance plus ``sigma_noise² I`` (B, C, C). Cost: O(S·B·C²)."""
        centred = self.samples - self.mean
        cov = torch.einsum("sbi,sbj->bij", centred, centred) / (self.n_samples - 1)
        eye = torch.eye(self.n_outputs, dtype=cov.dtype, device=cov.device)
        return cov + self.sigma_noise**2 * eye

    def to_gaussian(self) -> GaussianPredictive:
        """The moment-matched Gaussian N(mean, cov)."""
        return GaussianPredictive(self.mean, cov=self.cov)

    def probs(
        self,
        link_approx: LinkApprox | str = LinkApprox.MC,
        n_samples: int = 1000,
        seed: int = 0,
        bridge_correction: bool = True,
    ) -> torch.Tensor:
        """Class probabilities (B, C).

        ``"mc"`` (the default) averages softmax over the stored samples
        (``n_samples``/``seed`` are ignored: the samples are the draws).
        ``"probit"`` and ``"bridge"`` apply to the moment-matched Gaussian.
        """
        link = parse_link(link_approx)
        if link is LinkApprox.MC:
            return torch.softmax(self.samples, dim=-1).mean(0)
        return self.to_gaussian().probs(link, bridge_correction=bridge_correction)

    def sample(self, n_samples: int, seed: int = 0) -> torch.Tensor:
        """Resample (with replacement) ``n_samples`` of the stored samples, plus noise if set."""
        check_n_samples(n_samples)
        generator = links.make_generator(seed, self.samples.device)
        index = torch.randint(self.n_samples, (n_samples,), generator=generator, device=self.samples.device)
        draws = self.samples[index]
        noise = torch.randn(draws.shape, generator=generator, dtype=draws.dtype, device=draws.device)
        return draws + self.sigma_noise * noise

    def with_noise(self, sigma_noise: float | torch.Tensor) -> "SamplePredictive":
        """The same samples with observation noise ``sigma_noise`` (the predictive of y for regression).

        Raises:
            ValueError: Unless ``sigma_noise`` is finite and > 0.
        """
        check_positive(sigma_noise, "sigma_noise")
        return SamplePredictive(self.samples, sigma_noise=sigma_noise)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Log (1/S) sum_s N(y; f_s, sigma^2 I) per input (B,). Needs sigma_noise > 0."""
        y = self._check_targets(y)
        if not bool((self.sigma_noise > 0).all()):
            raise ValueError("log_prob of a sample predictive needs observation noise; call with_noise(sigma) first")
        noise_var = self.sigma_noise**2
        per_sample = -0.5 * (((y - self.samples) ** 2) / noise_var + torch.log(2 * math.pi * noise_var)).sum(-1)
        return torch.logsumexp(per_sample, dim=0) - math.log(self.n_samples)

    def __repr__(self) -> str:
        return f"SamplePredictive(S={self.n_samples}, B={len(self)}, C={self.n_outputs}, dtype={self.samples.dtype})"
