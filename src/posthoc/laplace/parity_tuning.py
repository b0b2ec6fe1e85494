"""laplace-torch's grid search over the prior precision with a user ``loss``, as ported code writes it.

laplace-torch's ``optimize_prior_precision(method="gridsearch", val_loader=..., loss=...)`` evaluates, for each
prior precision of ``log_prior_prec_base ** linspace(log_prior_prec_min, log_prior_prec_max, grid_size)``, the
predictive ``la(x, pred_type=, link_approx=, n_samples=, fitting=True)`` on every validation batch and scores it
with ``loss``:

- a callable: over the whole validation set at once, ``loss(probs, targets)`` for classification outputs and
  ``loss(f_mu, f_var, targets)`` for regression's ``(f_mu, f_var)``;
- a torchmetrics-style metric (``update`` / ``compute`` / ``reset``): ``update(*outputs, y)`` per batch (or
  ``update(f_mu, y)`` when it takes two arguments), then ``compute().sum()``.

The first grid value with the lowest loss wins; a value whose posterior cannot be factorised in the working
precision (``torch.linalg.LinAlgError``, e.g. a tiny prior in float32) scores +inf, as in laplace-torch. One
deliberate difference: the metric is reset before each grid
value here; laplace-torch 0.3 never resets it, so its score of the k-th value is the running mean over the first
k values. Without ``loss`` posthoc scores the validation NLL (posthoc's default, see docs/migration.md).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from posthoc.likelihood import Likelihood
from posthoc.network.inputs import ModelInputs
from posthoc.predictive.tuning import grid_search

Outputs = Any  # class probabilities (B, C), or the regression tuple (f_mu, f_var)


def is_metric(loss: Any) -> bool:
    """Whether ``loss`` is a running metric (torchmetrics' ``update`` / ``compute`` / ``reset``), not a callable."""
    return all(callable(getattr(loss, name, None)) for name in ("update", "compute", "reset"))


def validation_loss(predict: Callable[[ModelInputs], Outputs], batches: list[tuple[ModelInputs, torch.Tensor]],
                    loss: Any) -> float:
    """laplace-torch's score of the predictive ``predict(x)`` on validation ``batches`` (module docstring).

    Cost: one ``predict`` per batch, plus the loss.

    Raises:
        TypeError: ``loss`` is neither a metric nor a callable.
    """
    if is_metric(loss):
        loss.reset()
        for x, y in batches:
            out = predict(x)
            if isinstance(out, tuple):
                try:
                    loss.update(*out, y)
                except TypeError:  # a metric of (prediction, target) only: laplace-torch passes f_mu
                    loss.update(out[0], y)
            else:
                loss.update(out, y)
        return float(torch.as_tensor(loss.compute()).sum())
    if not callable(loss):
        raise TypeError(f"loss must be a callable or a torchmetrics-style metric, got {type(loss).__name__}")
    outputs = [predict(x) for x, _ in batches]
    targets = torch.cat([y for _, y in batches])
    if isinstance(outputs[0], tuple):
        return float(loss(torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs]), targets))
    return float(loss(torch.cat(outputs), targets))


def inf_if_singular(evaluate: Callable[[torch.Tensor], float]) -> Callable[[torch.Tensor], float]:
    """``evaluate`` scoring +inf where it raises ``torch.linalg.LinAlgError`` (laplace-torch's grid search does so)."""
    def scored(delta: torch.Tensor) -> float:
        try:
            return evaluate(delta)
        except torch.linalg.LinAlgError:
            return math.inf
    return scored


def validation_nll(likelihood: Likelihood, sigma_noise: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The grid-search score of posthoc as an offline loss: the summed NLL of the targets.

    Classification ``loss(probs (B, C), y (B,))``; regression ``loss(f_mu (B, C), f_cov (B, C, C), y)`` under
    N(f_mu, f_cov + sigma_noise^2 I), the predictive of y.
    """
    if likelihood is not Likelihood.REGRESSION:
        return lambda probs, y: -probs.gather(-1, y.reshape(-1, 1)).log().sum()

    def gaussian_nll(f_mu: torch.Tensor, f_cov: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cov = f_cov + sigma_noise**2 * torch.eye(f_mu.shape[-1], dtype=f_mu.dtype, device=f_mu.device)
        return -torch.distributions.MultivariateNormal(f_mu, cov).log_prob(y.reshape(f_mu.shape)).sum()
    return gaussian_nll


def laplace_torch_grid(log_min: float, log_max: float, grid_size: int, base: float,
                       dtype: torch.dtype) -> torch.Tensor:
    """``base ** linspace(log_min, log_max, grid_size)`` (G,), laplace-torch's interval.

    Raises:
        ValueError: a base that is not a positive number other than 1, or grid_size < 1.
    """
    if not (isinstance(base, float | int) and base > 0 and base != 1 and torch.isfinite(torch.tensor(float(base)))):
        raise ValueError(f"log_prior_prec_base must be a positive number other than 1, got {base}")
    if not isinstance(grid_size, int) or grid_size < 1:
        raise ValueError(f"grid_size must be a positive int, got {grid_size!r}")
    return torch.logspace(log_min, log_max, grid_size, base=float(base), dtype=dtype)


def gridsearch_with_loss(set_prior: Callable[[torch.Tensor], None], predict: Callable[[ModelInputs], Outputs],
                         batches: list[tuple[ModelInputs, torch.Tensor]], loss: Any, grid: torch.Tensor,
                         progress: bool = False) -> torch.Tensor:
    """The entry of ``grid`` (G,) whose predictive has the lowest :func:`validation_loss`; the first minimum wins.

    ``set_prior(delta)`` installs each value (a 0-d tensor) before ``predict`` runs. Cost: G validation passes.

    Raises:
        ValueError: no validation batches. FloatingPointError: no value has a finite loss.
    """
    if not batches:
        raise ValueError("val_loader yielded no batches")

    def evaluate(delta: torch.Tensor) -> float:
        set_prior(delta)
        return validation_loss(predict, batches, loss)

    return grid_search(inf_if_singular(evaluate), grid, what="validation loss", progress=progress)
