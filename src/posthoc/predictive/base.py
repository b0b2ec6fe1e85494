"""The predictive every posthoc method returns from ``.predict(x)``."""

from __future__ import annotations

import abc

import torch

from posthoc.predictive.links import LinkApprox
from posthoc.utils.checks import check_choice, check_finite, check_positive_int


class Predictive(abc.ABC):
    """A distribution over the network's C outputs for a batch of B inputs.

    Classification: outputs are logits, and ``probs`` applies a link
    approximation. Regression: outputs are means; ``with_noise(sigma)`` gives
    the distribution of y, and ``log_prob(y)`` its log density.
    """

    @property
    @abc.abstractmethod
    def mean(self) -> torch.Tensor:
        """Predictive mean (B, C)."""

    @property
    @abc.abstractmethod
    def var(self) -> torch.Tensor:
        """Predictive marginal variances (B, C)."""

    @property
    @abc.abstractmethod
    def cov(self) -> torch.Tensor:
        """Predictive covariance (B, C, C) (diagonal when only variances are known)."""

    @abc.abstractmethod
    def probs(self, link_approx: LinkApprox | str = ..., n_samples: int = 1000, seed: int = 0) -> torch.Tensor:
        """Class probabilities (B, C)."""

    @abc.abstractmethod
    def with_noise(self, sigma_noise: float | torch.Tensor) -> "Predictive":
        """The predictive of y = f + eps, eps ~ N(0, sigma_noise^2 I) (regression)."""

    @abc.abstractmethod
    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Log density (B,) of targets y (B, C) under this predictive (regression)."""

    @abc.abstractmethod
    def sample(self, n_samples: int, seed: int = 0) -> torch.Tensor:
        """Draw (S, B, C) output samples."""

    def __len__(self) -> int:
        """The batch size B."""
        return self.mean.shape[0]

    @property
    def n_outputs(self) -> int:
        """The number of outputs C (classes, or regression targets)."""
        return self.mean.shape[-1]

    def _check_targets(self, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(y, torch.Tensor):
            raise TypeError("y must be a torch.Tensor of targets with shape (B, C)")
        if y.ndim == 1 and self.n_outputs == 1:
            y = y.unsqueeze(-1)
        if y.shape != self.mean.shape:
            raise ValueError(
                f"targets must have the predictive's shape {tuple(self.mean.shape)}, got {tuple(y.shape)}"
            )
        return check_finite(y.to(self.mean.dtype), "y")


def parse_link(link_approx: LinkApprox | str) -> LinkApprox:
    """Convert ``link_approx`` (a :class:`LinkApprox` or its string value) to the enum.

    Raises:
        ValueError: For an unknown name, listing the valid ones.
    """
    return check_choice(link_approx, LinkApprox, "link_approx")


def check_n_samples(n_samples: int) -> None:
    """Raise ``ValueError`` unless ``n_samples`` is an ``int`` >= 1 (the samples drawn per input).

    Raises:
        ValueError: For ``bool``, non-``int`` or values below 1 (via ``check_positive_int``).
    """
    check_positive_int(n_samples, "n_samples", "the number of Monte Carlo samples per input")


def laplace_torch_outputs(pred: Predictive, regression: bool, link_approx: LinkApprox | str | None = None,
                          n_samples: int = 1000, seed: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """What laplace-torch's ``la(x)`` returns, from a predictive of f: the ``__call__`` of every family.

    Regression: ``(f_mu (B, C), f_var (B, C, C))``, the distribution of the function WITHOUT observation noise
    (add ``sigma_noise**2`` for y, or use ``predict(x).with_noise(sigma_noise)``). Classification: class
    probabilities (B, C) by ``link_approx`` (None: the predictive's own default); ``n_samples`` and ``seed`` are
    used by the "mc" link only. Cost: that of the link; ``f_var`` allocates B C^2 when only variances are known.
    """
    if regression:
        return pred.mean, pred.cov
    if link_approx is None:
        return pred.probs(n_samples=n_samples, seed=seed)
    return pred.probs(link_approx, n_samples=n_samples, seed=seed)
