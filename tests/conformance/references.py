"""Dense brute-force references for the conformance family, and the table of expected errors.

Nothing here calls the estimators' own Jacobian or curvature code: the covered function is the eval-mode
reference network with the covered parameters replaced (``torch.func.functional_call``), differentiated with
``torch.func.jacrev``; the GGN uses the likelihood's output Hessian from tests/references.py.
"""

from __future__ import annotations

import fnmatch
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import pytest
import torch
from conformance.models import Case
from references import output_hessians
from torch import nn
from torch.func import functional_call, jacrev

SUBNETWORK_STRIDE = 3  # the subnetwork covers every third entry of the all-weights vector
Z_MAX = 4.0  # standard errors allowed for a Monte-Carlo moment


@dataclass
class Covered:
    """The network as a function of the flat vector theta (P,) of its covered entries.

    ``names``: the covered parameter tensors, by their canonical names in ``model.named_parameters()`` order
    (a tied Parameter appears once); ``indices``: the covered positions in their concatenation (subnetwork),
    or None for all of it.
    """

    model: nn.Module
    names: list[str]
    indices: torch.Tensor | None

    def _base(self) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def theta(self) -> torch.Tensor:
        """(P,) the reference weights' covered entries: where the posterior must be centred."""
        base = self._base()
        return base if self.indices is None else base[self.indices]

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """(B, C) outputs of the eval-mode network with the covered entries set to theta."""
        full = theta if self.indices is None else self._base().index_put((self.indices,), theta)
        params = dict(self.model.named_parameters())
        pieces = torch.split(full, [params[n].numel() for n in self.names])
        replaced = {n: piece.view(params[n].shape) for n, piece in zip(self.names, pieces, strict=True)}
        return functional_call(self.model, replaced, (x,))

    def block_sizes(self) -> list[int]:
        """The number of covered entries of each covered parameter tensor, in theta order (empty ones left out)."""
        params = dict(self.model.named_parameters())
        sizes = [params[n].numel() for n in self.names]
        if self.indices is None:
            return sizes
        edges = torch.tensor([0] + sizes).cumsum(0)
        counts = [int(((self.indices >= lo) & (self.indices < hi)).sum())
                  for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        return [c for c in counts if c > 0]

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, P) by torch.func.jacrev."""
        return jacrev(lambda th: self.forward(x, th))(self.theta()).detach()


def covered(case: Case, subset_of_weights: str) -> Covered:
    """What a correct estimator covers: every parameter that requires grad ("all", "subnetwork": every
    SUBNETWORK_STRIDE-th entry of their concatenation, the positions ``subnetwork_indices`` takes), or those of
    the layer that produces the outputs ("last_layer"), by identity so a tied Parameter keeps its first name."""
    model = case.reference
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if subset_of_weights == "last_layer":
        mine = {id(p) for p in model.get_submodule(case.last_layer).parameters() if p.requires_grad}
        return Covered(model, [n for n, p in trainable if id(p) in mine], None)
    names = [n for n, _ in trainable]
    if subset_of_weights == "subnetwork":
        total = sum(p.numel() for _, p in trainable)
        return Covered(model, names, torch.arange(0, total, SUBNETWORK_STRIDE))
    return Covered(model, names, None)


def assert_covers(n_params: int, cov: Covered, subset_of_weights: str) -> None:
    """The estimator's posterior has as many entries as the parameters a correct one covers."""
    assert n_params == cov.theta().numel(), (
        f"subset_of_weights={subset_of_weights!r} covers {n_params} entries; the network's {cov.names} have "
        f"{cov.theta().numel()}")


def curvature_scale(case: Case, sigma_noise: float) -> float:
    """The factor s of the GGN in Lambda = s H + delta I: 1 for classification, sigma^-2 for regression."""
    return 1.0 if case.likelihood == "classification" else sigma_noise ** -2


def dense_precision(cov: Covered, case: Case, prior: float, scale: float) -> torch.Tensor:
    """Lambda = s sum_n J_n^T Gamma_n J_n + prior I, (P, P), over the whole training set."""
    jac = cov.jacobian(case.x)
    with torch.no_grad():
        gamma = output_hessians(case.reference(case.x), case.likelihood)
    ggn = torch.einsum("bcp,bcd,bdq->pq", jac, gamma.detach(), jac)
    return scale * ggn + prior * torch.eye(ggn.shape[0], dtype=ggn.dtype)


def log_evidence(cov: Covered, case: Case, prior: float, sigma_noise: float, precision: torch.Tensor) -> float:
    """The Laplace evidence log p(D | theta*) - prior/2 ||theta*||^2 + P/2 log prior - 1/2 log det Lambda, with
    theta* the reference weights and the likelihood (Gaussian with sigma_noise for regression) evaluated densely."""
    with torch.no_grad():
        out = case.reference(case.x)
    if case.likelihood == "classification":
        loglik = -float(torch.nn.functional.cross_entropy(out, case.y, reduction="sum"))
    else:
        loglik = float(-0.5 * (case.y - out).square().sum() / sigma_noise**2
                       - 0.5 * out.numel() * math.log(2 * math.pi * sigma_noise**2))
    theta = cov.theta()
    return (loglik - 0.5 * prior * float(theta.square().sum()) + 0.5 * theta.numel() * math.log(prior)
            - 0.5 * float(torch.linalg.slogdet(precision).logabsdet))


def covariance(precision: torch.Tensor) -> torch.Tensor:
    """Lambda^-1 by Cholesky, symmetrised."""
    inv = torch.cholesky_inverse(torch.linalg.cholesky(precision))
    return 0.5 * (inv + inv.T)


def glm_covariance(cov: Covered, x: torch.Tensor, posterior_cov: torch.Tensor) -> torch.Tensor:
    """J(x) Sigma J(x)^T, (B, C, C)."""
    jac = cov.jacobian(x)
    return jac @ posterior_cov @ jac.transpose(1, 2)


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Entrywise |actual - expected| <= rtol (|expected| + 1e-3 max|expected|): relative, with a floor for
    entries that cancel to near zero (off-diagonal covariances)."""
    floor = 1e-3 * float(expected.abs().max())
    err = (actual - expected).abs() / (expected.abs() + floor)
    assert float(err.max()) <= rtol, f"{what}: max relative error {float(err.max()):.3g} > {rtol:g}"


def assert_mean_is_eval_model(mean: torch.Tensor, case: Case, x: torch.Tensor) -> None:
    """The predictive mean equals the eval-mode network at the weights of fit, to 1e-6."""
    with torch.no_grad():
        expected = case.reference(x)
    err = float((mean - expected).abs().max())
    assert err <= 1e-6, f"predictive mean differs from the eval-mode model(x) by {err:.3g} (max abs)"


def assert_finite_psd(cov: torch.Tensor, what: str) -> None:
    """(B, C, C) finite, symmetric and positive semi-definite up to round-off."""
    assert bool(torch.isfinite(cov).all()), f"{what} has NaN/Inf"
    scale = float(cov.abs().max()) + 1e-300
    assert float((cov - cov.transpose(-1, -2)).abs().max()) <= 1e-8 * scale, f"{what} is not symmetric"
    assert float(torch.linalg.eigvalsh(0.5 * (cov + cov.transpose(-1, -2))).min()) >= -1e-8 * scale, \
        f"{what} is not positive semi-definite"


def assert_samples_match(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, block_sizes: list[int],
                         seed: int = 0) -> None:
    """Samples (S, P) of N(mean, cov), by a few Gaussian statistics, each within Z_MAX standard errors (few
    statistics, so that a correct sampler with another random stream passes: about 1e-3 false alarms per call):

    - centring: the Mahalanobis distance S (m - mean)^T cov^-1 (m - mean) ~ chi^2_P, standardised;
    - the variance along the top and bottom eigenvectors of ``cov`` and 2 random directions (sd sqrt(2 / (S - 1))
      relative);
    - the total variance tr(Cov_b) of each block of consecutive entries (one per parameter tensor; sd
      sqrt(2 tr(cov_b^2) / (S - 1))), so one mis-scaled tensor shows.
    """
    n, p = samples.shape
    diff = samples.mean(0) - mean
    mahalanobis = n * float(diff @ torch.linalg.solve(cov, diff))
    z_mean = (mahalanobis - p) / math.sqrt(2 * p)
    assert z_mean < Z_MAX, (f"weight samples are not centred on the model's weights: Mahalanobis distance "
                            f"{mahalanobis:.4g} for {p} entries ({z_mean:.1f} standard errors)")
    centred = samples - samples.mean(0)
    evecs = torch.linalg.eigh(cov).eigenvectors
    randoms = torch.randn(p, 2, generator=torch.Generator().manual_seed(seed), dtype=cov.dtype)
    directions = torch.cat([evecs[:, -1:], evecs[:, :1], randoms / randoms.norm(dim=0)], dim=1)
    sample_var = (centred @ directions).square().sum(0) / (n - 1)
    true_var = ((cov @ directions) * directions).sum(0)
    z = (sample_var / true_var - 1) / math.sqrt(2 / (n - 1))
    for k, what in enumerate(["the top eigenvector", "the bottom eigenvector", "a random direction",
                              "a random direction"]):
        assert abs(float(z[k])) < Z_MAX, (f"weight sample variance along {what} of Lambda^-1 is "
                                          f"{float(sample_var[k]):.4g}, expected {float(true_var[k]):.4g} "
                                          f"({float(z[k]):.1f} standard errors)")
    start = 0
    for size in block_sizes:
        block = cov[start:start + size, start:start + size]
        total = float(centred[:, start:start + size].square().sum()) / (n - 1)
        z_block = (total - float(block.trace())) / math.sqrt(2 * float(block.square().sum()) / (n - 1))
        assert abs(z_block) < Z_MAX, (f"weight samples of entries {start}..{start + size - 1}: total variance "
                                      f"{total:.4g}, expected {float(block.trace()):.4g} "
                                      f"({z_block:.1f} standard errors)")
        start += size


# ------------------------------------------------------------------------------------------- expected errors
@dataclass(frozen=True)
class Expected:
    """A (model, estimator) pair that must raise ``error`` with a message matching ``match``, and why."""

    models: str  # fnmatch pattern over model names
    estimators: str  # fnmatch pattern over estimator ids
    error: type[Exception] | tuple[type[Exception], ...]
    match: str
    why: str


@contextmanager
def outcome(table: list[Expected], model: str, estimator: str) -> Iterator[None]:
    """Run the body; if the pair is listed in ``table`` it must raise the listed error instead of answering."""
    hits = [e for e in table if fnmatch.fnmatchcase(model, e.models) and fnmatch.fnmatchcase(estimator, e.estimators)]
    assert len(hits) <= 1, f"{model} x {estimator} matches several expected errors: {hits}"
    if not hits:
        yield
        return
    with pytest.raises(hits[0].error, match=hits[0].match):
        yield
