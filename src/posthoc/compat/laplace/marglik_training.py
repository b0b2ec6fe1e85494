"""``laplace.marglik_training``: laplace-torch's signature on :func:`posthoc.laplace.marglik_training.marglik_training`."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch
from torch import nn

from posthoc.compat.laplace.baselaplace import Laplace, curvature_from_backend
from posthoc.compat.laplace.curvature import AsdlGGN
from posthoc.laplace.marglik_training import marglik_training as _marglik_training

__all__ = ["marglik_training"]


def marglik_training(
    model: nn.Module,
    train_loader: Iterable,
    likelihood: str = "classification",
    hessian_structure: str = "kron",
    backend: type = AsdlGGN,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: dict[str, Any] | None = None,
    scheduler_cls: Callable[..., Any] | None = None,
    scheduler_kwargs: dict[str, Any] | None = None,
    n_epochs: int = 300,
    lr_hyp: float = 0.1,
    prior_structure: str = "layerwise",
    n_epochs_burnin: int = 0,
    n_hypersteps: int = 10,
    marglik_frequency: int = 1,
    prior_prec_init: float = 1.0,
    sigma_noise_init: float = 1.0,
    temperature: float = 1.0,
    fix_sigma_noise: bool = False,
    progress_bar: bool = False,
    enable_backprop: bool = False,
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
    checkpoint: str | os.PathLike | None = None,
) -> tuple[Laplace, nn.Module, list[float], list[float]]:
    """Marginal-likelihood training with laplace-torch's arguments; returns (la, model, margliks, losses).

    ``backend`` chooses the curvature as in :class:`posthoc.compat.laplace.Laplace` (a GGN backend: "ggn");
    everything else is :func:`posthoc.laplace.marglik_training.marglik_training`, and ``la`` is a
    :class:`posthoc.compat.laplace.Laplace`.

    ``enable_backprop`` makes the returned Laplace's ``la(x)`` differentiable in x. ``checkpoint`` (posthoc's
    addition; not in laplace-torch) makes the run resumable after an interruption.

    Raises:
        ValueError: a Hessian backend. NotImplementedError: ``temperature`` != 1.
    """
    curvature, _ = curvature_from_backend(backend, None, None)
    la, model, margliks, losses = _marglik_training(
        model, train_loader, getattr(likelihood, "value", likelihood), getattr(hessian_structure, "value",
                                                                             hessian_structure),
        curvature=curvature, optimizer_cls=optimizer_cls, optimizer_kwargs=optimizer_kwargs,
        scheduler_cls=scheduler_cls, scheduler_kwargs=scheduler_kwargs, n_epochs=n_epochs, lr_hyp=lr_hyp,
        prior_structure=getattr(prior_structure, "value", prior_structure), n_epochs_burnin=n_epochs_burnin,
        n_hypersteps=n_hypersteps, marglik_frequency=marglik_frequency, prior_prec_init=prior_prec_init,
        sigma_noise_init=sigma_noise_init, temperature=temperature, fix_sigma_noise=fix_sigma_noise,
        progress_bar=progress_bar, dict_key_x=dict_key_x, dict_key_y=dict_key_y, laplace_cls=Laplace,
        checkpoint=checkpoint)
    assert isinstance(la, Laplace)
    la.enable_backprop = bool(enable_backprop)  # the returned Laplace covers all weights, where backprop works
    return la, model, margliks, losses
