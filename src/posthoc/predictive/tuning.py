"""Tuning the prior precision delta (and the noise sigma) of a fitted posterior without refitting.

The one grid search, evidence maximisation and hyperparameter validation that ``Laplace`` and ``ScaLLA`` share:

    best = grid_search(validation_loss, grid)            # the grid value with the lowest loss (first wins)
    prior, sigma = maximise_evidence(evidence, log_prior, sigma, tune_sigma_noise, n_steps=100, lr=0.1)

The estimators supply what differs (how a delta becomes a validation loss, their evidence, their default
grid); the search, the ascent, and the checks of delta, sigma and the grid live here once.
"""

from __future__ import annotations

import math
import warnings
from enum import Enum
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from posthoc.distributed import sum_over_ranks
from posthoc.likelihood import Likelihood
from posthoc.metrics import multilabel_nll, nll
from posthoc.predictive.base import Predictive
from posthoc.predictive.links import LinkApprox
from posthoc.utils.checks import check_choice, check_positive
from posthoc.utils.optim import maximise


class PriorOptimization(str, Enum):
    """How ``optimize_prior_precision`` tunes delta (laplace-torch's ``TuningMethod``)."""

    MARGLIK = "marglik"  # Adam on log delta (and log sigma) maximising the estimator's evidence
    GRIDSEARCH = "gridsearch"  # the grid value with the lowest validation loss


class PriorStructure(str, Enum):
    """The shape of the prior precision that marglik tunes (laplace-torch's names)."""

    SCALAR = "scalar"  # one delta
    LAYERWISE = "layerwise"  # one delta per parameter tensor
    DIAG = "diag"  # one delta per parameter


# posthoc's earlier names, accepted with a DeprecationWarning naming laplace-torch's
_OLD_PRIOR_STRUCTURES = {"layer": PriorStructure.LAYERWISE, "parameter": PriorStructure.DIAG}


def prior_structure_choice(value: PriorStructure | str) -> PriorStructure:
    """``value`` as a :class:`PriorStructure`, accepting the deprecated names.

    The old names "layer" and "parameter" warn (DeprecationWarning) and map to "layerwise" and "diag".

    Raises:
        ValueError: For any other name, listing the valid ones.
    """
    if not isinstance(value, PriorStructure) and value in _OLD_PRIOR_STRUCTURES:
        new = _OLD_PRIOR_STRUCTURES[value]
        warnings.warn(f"prior_structure={value!r} is deprecated; pass prior_structure={new.value!r} "
                      "(laplace-torch's name)", DeprecationWarning, stacklevel=3)
        return new
    return check_choice(value, PriorStructure, "prior_structure")


def method_choice(pred_type: Any, method: PriorOptimization | str | None,
                  has_val_loader: bool = False) -> tuple[Any, PriorOptimization]:
    """Read laplace-torch's ``(pred_type, method)`` order, accepting posthoc's old one.

    ``method=None`` (posthoc's default) picks "gridsearch" when a validation loader is given
    (``has_val_loader``) and "marglik" otherwise: the evidence's scalar prior was 10-1000x below the
    validation-NLL optimum on every classification task of benchmarks/defaults.py (issue 17). laplace-torch's
    default is always "marglik" (a val_loader ignored): pass ``method="marglik"`` for that.

    posthoc's ``optimize_prior_precision`` took the method as its first argument, where laplace-torch takes the
    pred_type: a first argument that names a method ("marglik", "gridsearch") is taken as the method with a
    DeprecationWarning and ``pred_type`` is returned as None (the caller's default).

    Returns:
        (pred_type or None, the method).

    Raises:
        ValueError: an unknown method.
        TypeError: the old positional method together with a different ``method=``.
    """
    methods = {m.value for m in PriorOptimization}
    if isinstance(pred_type, str) and pred_type in methods:
        old = PriorOptimization(pred_type)
        if method is not None and check_choice(method, PriorOptimization, "method") not in (
                PriorOptimization.MARGLIK, old):
            raise TypeError(f"the method is given twice ({old.value!r} as the first argument, which is now "
                            f"pred_type, and method={method!r}); pass it once, as method=")
        warnings.warn(f"optimize_prior_precision({old.value!r}, ...) passes the method where laplace-torch's order "
                      f"(which posthoc now follows) puts pred_type; pass method={old.value!r}",
                      DeprecationWarning, stacklevel=3)
        return None, old
    if method is None:
        return pred_type, PriorOptimization.GRIDSEARCH if has_val_loader else PriorOptimization.MARGLIK
    return pred_type, check_choice(method, PriorOptimization, "method")


# ----------------------------------------------------------------- validation
def checked_prior_precision(value: torch.Tensor) -> torch.Tensor:
    """The one value check of a prior precision: entries finite and > 0; returned 1-D.

    The result is not detached (it stays differentiable). Each estimator then checks the length it accepts
    (Laplace: 1, per tensor or per parameter; ScaLLA: 1). Cost: one pass over ``value``.

    Raises:
        ValueError: Naming the first bad entry, or for a tensor of more than one dimension (its entries would be
            read in flattened order against an unknown layout; laplace-torch refuses it too).
    """
    if isinstance(value, torch.Tensor) and value.ndim > 1:
        raise ValueError(f"prior_precision must be a scalar or a 1-D tensor (one value, one per parameter tensor or "
                         f"one per parameter), got shape {tuple(value.shape)}")
    check_positive(value, "prior_precision")
    return value.reshape(-1)


def checked_sigma_noise(value: torch.Tensor, likelihood: Likelihood) -> torch.Tensor:
    """The one check of sigma_noise: a finite scalar > 0, and 1 for classification; returned 0-d.

    The result is not detached (it stays differentiable).

    Raises:
        ValueError: For a non-scalar, a value not finite and > 0, or a value other than 1 for classification.
    """
    if value.numel() != 1:
        raise ValueError(f"sigma_noise must be a scalar, got shape {tuple(value.shape)}")
    check_positive(value, "sigma_noise")
    if likelihood is not Likelihood.REGRESSION and float(value) != 1.0:
        raise ValueError(f"sigma_noise is for regression; leave it at 1 for {likelihood.value}")
    return value.reshape(())


def tune_sigma_noise_choice(tune_sigma_noise: bool | None, likelihood: Likelihood) -> bool:
    """Resolve ``tune_sigma_noise``: None means tune sigma for regression only.

    Raises:
        ValueError: For True with classification.
    """
    if tune_sigma_noise is None:
        return likelihood is Likelihood.REGRESSION
    if tune_sigma_noise and likelihood is not Likelihood.REGRESSION:
        raise ValueError("tune_sigma_noise applies to regression only")
    return bool(tune_sigma_noise)


def log_prior_start(init_prior_prec: float | None, current: torch.Tensor, size: int) -> torch.Tensor:
    """Where marglik starts: log delta of shape (size,), in ``current``'s dtype and device.

    Every entry is log(init_prior_prec), by default the log of the mean ``current`` delta.

    Raises:
        ValueError: For an ``init_prior_prec`` that is not finite and > 0.
    """
    if init_prior_prec is not None:
        check_positive(init_prior_prec, "init_prior_prec")
    start = float(init_prior_prec) if init_prior_prec is not None else float(current.mean())
    return torch.full((size,), math.log(start), dtype=current.dtype, device=current.device)


def default_grid(log_min: float, log_max: float, size: int, dtype: torch.dtype) -> torch.Tensor:
    """``size`` prior precisions log-spaced from 10**log_min to 10**log_max (laplace-torch's interval)."""
    return torch.logspace(log_min, log_max, size, dtype=dtype)


def checked_grid(grid: torch.Tensor | Any, dtype: torch.dtype) -> torch.Tensor:
    """A grid of prior precisions as a 1-D tensor of ``dtype`` (a scalar becomes one value).

    Raises ValueError for an empty or multi-dimensional grid or a value that is not finite and > 0 in ``dtype``.
    """
    grid = torch.as_tensor(grid, dtype=dtype)
    if grid.ndim > 1 or grid.numel() == 0:
        raise ValueError(f"grid must be a non-empty 1-D tensor of prior precisions, got shape {tuple(grid.shape)}")
    check_positive(grid, "grid")
    return grid.reshape(-1)


# ----------------------------------------------------------------- the two methods
def grid_search(evaluate: Callable[[torch.Tensor], float], grid: torch.Tensor, *, sum_ranks: bool = False,
                what: str = "validation NLL", progress: bool = False) -> torch.Tensor:
    """The entry of ``grid`` (G,) with the lowest ``evaluate(grid[i])``; the first minimum wins.

    ``evaluate`` returns a loss (a float; NaN counts as +inf) and may change the estimator's state (it is called
    once per entry, in order). ``sum_ranks``: the losses are sums over each rank's shard of the validation
    data, summed over the ranks under torch.distributed (one all-reduce) so every rank picks the same value.
    Cost: G calls of ``evaluate``.

    Returns:
        ``grid[best]``, a 0-d tensor.

    Raises:
        FloatingPointError: no entry has a finite loss.
    """
    losses = torch.zeros(len(grid), dtype=torch.float64)
    for i, value in enumerate(tqdm(grid, desc="grid search", disable=not progress, leave=False)):
        losses[i] = evaluate(value)
    if sum_ranks:
        (losses,) = sum_over_ranks([losses], f"the {what} of the grid")
    losses = torch.where(torch.isnan(losses), math.inf, losses)
    if not bool(torch.isfinite(losses).any()):
        raise FloatingPointError(f"the {what} is not finite for any prior precision on the grid")
    return grid[int(torch.argmin(losses))]


def maximise_evidence(evidence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], log_prior: torch.Tensor,
                      sigma_noise: torch.Tensor, tune_sigma_noise: bool, n_steps: int, lr: float,
                      what: str = "marginal likelihood",
                      progress: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Maximise ``evidence(delta, sigma)`` by Adam on log delta (and log sigma if ``tune_sigma_noise``).

    Runs ``n_steps`` steps of :func:`posthoc.utils.optim.maximise`. Cost: ``n_steps`` evidence evaluations and
    their backward passes.

    Args:
        evidence: the estimator's differentiable evidence in (delta, sigma).
        log_prior: the starting log delta, of the shape to tune ((1,), (n_tensors,), (P,) or ()); copied.
        sigma_noise: the starting sigma (0-d).
        tune_sigma_noise: also tune sigma (regression); else sigma stays fixed.
        n_steps: the number of Adam steps.
        lr: Adam's learning rate on the log scale.
        what: the evidence's name in error messages.
        progress: show a tqdm progress bar.

    Returns:
        (delta, sigma): the tuned values, detached; sigma is None unless tuned.

    Raises:
        FloatingPointError naming ``what`` as soon as the evidence stops being finite.
    """
    log_prior = log_prior.detach().clone().requires_grad_(True)
    log_sigma = sigma_noise.detach().log().clone().requires_grad_(tune_sigma_noise)
    maximise(lambda: evidence(log_prior.exp(), log_sigma.exp()),
             [log_prior] + ([log_sigma] if tune_sigma_noise else []), n_steps, lr, what, progress)
    return log_prior.detach().exp(), (log_sigma.detach().exp() if tune_sigma_noise else None)


def validation_nll_sum(pred: Predictive, y: torch.Tensor, likelihood: Likelihood, sigma_noise: torch.Tensor,
                       link_approx: LinkApprox | str, seed: int) -> float:
    """Summed NLL of a batch's targets ``y`` under ``pred``: the grid-search loss of both estimators.

    Classification goes through ``link_approx`` (seeded), regression adds the observation noise ``sigma_noise``;
    binary (independent Bernoulli outputs, ``pred`` a BernoulliPredictive): the BCE summed over the batch's
    labels, through the sigmoid ``link_approx``. Cost: one ``probs`` or ``log_prob`` call on the batch.
    """
    if likelihood is Likelihood.BINARY:
        probs = pred.probs(link_approx, seed=seed)
        return multilabel_nll(probs, y.reshape(probs.shape)) * probs.numel()
    if likelihood is Likelihood.CLASSIFICATION:
        return nll(pred.probs(link_approx, seed=seed), y) * len(y)
    return float(-pred.with_noise(sigma_noise).log_prob(y.reshape(pred.mean.shape)).sum())
