"""Predictive probabilities of independent Bernoulli outputs (``Likelihood.BINARY``): the sigmoid links.

A Gaussian N(mu, Sigma) over logits f (B, K) gives each output k the probability E[sigmoid(f_k)], which depends
on the marginal N(mu_k, Sigma_kk) only (the outputs are independent Bernoullis, so cross-covariances do not
enter a label's probability). Two links:

- "probit": MacKay's approximation (1992), sigmoid(mu_k / sqrt(1 + pi Sigma_kk / 8)): sigmoid(t) is replaced
  by Phi(sqrt(pi / 8) t), whose Gaussian average is exact. Cost O(BK). Its absolute error in E[sigmoid(f)]
  stays below 0.03 (0.028 at most on a grid of means in [-20, 20] and variances in [1e-4, 1e4], against
  Gauss-Hermite quadrature; largest at large variances), and it is exact at zero variance and at mu = 0.
- "mc": the average of sigmoid over S draws of the logits. Cost O(SBK) (O(SBK^2 + BK^3) from a full covariance).

"probit_centred" and "bridge" are softmax links (they rest on softmax's invariance to a shift of all logits,
which the sigmoid does not have) and are refused.
"""

from __future__ import annotations

import math

import torch

from posthoc.predictive import links
from posthoc.predictive.base import Predictive, check_n_samples, parse_link
from posthoc.predictive.gaussian import GaussianPredictive
from posthoc.predictive.links import LinkApprox
from posthoc.predictive.samples import SamplePredictive

BERNOULLI_LINKS = (LinkApprox.PROBIT, LinkApprox.MC)


def bernoulli_link(link_approx: LinkApprox | str | None, default: LinkApprox = LinkApprox.PROBIT) -> LinkApprox:
    """The sigmoid link to use: ``link_approx`` checked, or ``default`` for None.

    Raises:
        ValueError: an unknown link, or a softmax-only one ("probit_centred", "bridge").
    """
    if link_approx is None:
        return default
    link = parse_link(link_approx)
    if link not in BERNOULLI_LINKS:
        raise ValueError(f"link_approx={link.value!r} is a softmax link; independent Bernoulli outputs "
                         "(likelihood='binary') support 'probit' (MacKay's sigmoid approximation) or 'mc'")
    return link


def sigmoid_probit(mean: torch.Tensor, cov_or_var: torch.Tensor) -> torch.Tensor:
    """MacKay's approximation of E[sigmoid(f)]: sigmoid(mu / sqrt(1 + pi v / 8)) elementwise, (B, K).

    ``cov_or_var``: a full covariance (B, K, K) (its diagonal is used) or variances (B, K). Cost O(BK).
    """
    return torch.sigmoid(mean * torch.rsqrt(1.0 + math.pi / 8.0 * links.diagonal(cov_or_var)))


def sigmoid_mc(mean: torch.Tensor, cov_or_var: torch.Tensor, n_samples: int,
               generator: torch.Generator) -> torch.Tensor:
    """Monte Carlo E[sigmoid(f)], f ~ N(mean, Sigma), (B, K) from ``n_samples`` draws. Cost O(SBK + BK^3)."""
    return torch.sigmoid(links.sample_gaussian(mean, cov_or_var, n_samples, generator)).mean(0)


def bernoulli_log_prob(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum_k log p(y_k) (B,) for label probabilities (B, K) and targets y (B, K) in {0, 1} (clamped away from 0)."""
    tiny = torch.finfo(probs.dtype).tiny
    return (y * probs.clamp_min(tiny).log() + (1 - y) * (1 - probs).clamp_min(tiny).log()).sum(-1)


class BernoulliPredictive(Predictive):
    """A predictive over logits (B, K) of independent Bernoulli outputs; ``probs`` gives P(y_k = 1), (B, K).

    Wraps the predictive of the logits, ``logits`` (a :class:`GaussianPredictive`, e.g. Laplace's glm one, or a
    :class:`SamplePredictive`, e.g. its nn one): mean, var, cov and samples are the logits'. ``probs`` uses
    the sigmoid links of this module (a Gaussian: "probit" by default; samples: "mc", the average of sigmoid
    over the stored samples, by default, "probit" on their moment-matched Gaussian).
    """

    def __init__(self, logits: Predictive) -> None:
        if not isinstance(logits, GaussianPredictive | SamplePredictive):
            raise TypeError(f"logits must be a GaussianPredictive or SamplePredictive, got {type(logits).__name__}")
        self.logits = logits

    @property
    def mean(self) -> torch.Tensor:
        """The logits' predictive mean (B, K)."""
        return self.logits.mean

    @property
    def var(self) -> torch.Tensor:
        """The logits' marginal variances (B, K)."""
        return self.logits.var

    @property
    def cov(self) -> torch.Tensor:
        """The logits' covariance (B, K, K)."""
        return self.logits.cov

    def probs(self, link_approx: LinkApprox | str | None = None, n_samples: int = 1000,
              seed: int = 0) -> torch.Tensor:
        """P(y_k = 1 | x) per output, (B, K) (each in [0, 1]; they do not sum to 1 over k).

        ``link_approx``: "probit" (MacKay) or "mc"; None: "probit" for a Gaussian, "mc" for samples.
        ``n_samples`` and ``seed``: the draws of "mc" from a Gaussian (samples use their stored draws).

        Raises:
            ValueError: a softmax-only link ("probit_centred", "bridge"), bad ``n_samples``.
        """
        if isinstance(self.logits, SamplePredictive):
            link = bernoulli_link(link_approx, LinkApprox.MC)
            if link is LinkApprox.MC:
                return torch.sigmoid(self.logits.samples).mean(0)
            gaussian = self.logits.to_gaussian()
            return sigmoid_probit(gaussian.mean, gaussian.var)
        link = bernoulli_link(link_approx)
        if link is LinkApprox.PROBIT:
            return sigmoid_probit(self.mean, self.var)
        check_n_samples(n_samples)
        cov_or_var = self.logits.cov if self.logits.has_full_cov else self.logits.var
        return sigmoid_mc(self.mean, cov_or_var, n_samples, links.make_generator(seed, self.mean.device))

    def with_noise(self, sigma_noise: float | torch.Tensor) -> Predictive:
        """Not defined: Bernoulli outputs have no observation noise.

        Raises:
            TypeError: always.
        """
        raise TypeError("with_noise is for regression; Bernoulli outputs have no observation noise (use probs())")

    def log_prob(self, y: torch.Tensor, link_approx: LinkApprox | str | None = None) -> torch.Tensor:
        """Log predictive probability (B,) of targets y (B, K) in {0, 1} ((B,) for K = 1), under ``probs``.

        Raises:
            ValueError: targets of another shape or with values other than 0 and 1.
        """
        y = self._check_targets(y)
        if bool(((y != 0) & (y != 1)).any()):
            raise ValueError("Bernoulli targets must be 0 or 1")
        return bernoulli_log_prob(self.probs(link_approx), y)

    def sample(self, n_samples: int, seed: int = 0) -> torch.Tensor:
        """Logit samples (S, B, K) (the logits' predictive; apply sigmoid for probabilities)."""
        return self.logits.sample(n_samples, seed=seed)

    def __repr__(self) -> str:
        return f"BernoulliPredictive({self.logits!r})"
