"""Marginal-likelihood training: the online Laplace of Immer et al. (2021), laplace-torch's ``marglik_training``.

MAP training of the network on the regularised loss alternates with gradient steps on the hyperparameters
(the prior precision delta and, for regression, the noise sigma) that maximise the Laplace evidence of the
current weights. Each epoch:

1. one pass of ``optimizer_cls`` over the data on the loss, per batch,
   ``criterion(f(x), y) + delta^T theta^2 / (2 N c)``, with ``criterion`` the mean cross-entropy (classification)
   or mean squared error (regression) and ``c`` = 1 (classification) or 1 / (2 sigma^2) (regression): the
   negative log joint divided by N in the criterion's units;
2. every ``marglik_frequency`` epochs after ``n_epochs_burnin``: a Laplace (``subset_of_weights="all"``) is
   fitted at the current weights and ``n_hypersteps`` Adam steps on log delta (and log sigma) maximise its
   evidence (no refit between steps: the evidence is a function of delta and sigma).

The weights and hyperparameters with the best evidence seen (the values of the last hyperparameter step of an
estimate, where its evidence was evaluated) are restored at the end and a Laplace is fitted there. Cost: ``n_epochs`` training epochs plus one Laplace fit per evidence estimate.

Resumable (``checkpoint=PATH``): after every epoch the network, both optimisers, the scheduler, the
hyperparameters, the evidence and loss histories, the best state so far and torch's random state are written to
``PATH`` (a :mod:`posthoc.utils.checkpoint` file, atomic; its folder is checked writable before training).
Called again with the same arguments after an interruption (KeyboardInterrupt, a killed process), it resumes
after the last finished epoch and returns what an uninterrupted run returns, bitwise; a finished run's file
stays, so a rerun only refits the final Laplace. The file is resumed only by the same computation: its
fingerprint holds the settings (optimiser and scheduler keyword arguments by their repr), a digest of the
network's weights and buffers *before* training (rebuild the model as the interrupted run started it) and an
order-independent digest of the training examples (one pass over the loader; a shuffling loader gives the same
digest, a loader with random augmentation or other data does not); otherwise a CheckpointError names what
differs.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from posthoc.laplace.laplace import Laplace
from posthoc.laplace.prior import per_parameter
from posthoc.likelihood import Likelihood, check_supported
from posthoc.network.inputs import as_model_inputs, tensor_leaves
from posthoc.network.subset import ParameterSubset
from posthoc.predictive.tuning import PriorStructure, prior_structure_choice
from posthoc.utils.checkpoint import load_checkpoint, module_digest, save_checkpoint
from posthoc.utils.checks import check_choice, check_positive_int
from posthoc.utils.io import check_writable

CHECKPOINT_KIND = "marglik_training"


def _batch(data: Any, dict_key_x: str, dict_key_y: str) -> tuple[Any, torch.Tensor]:
    if isinstance(data, Mapping):
        return data[dict_key_x], data[dict_key_y]
    x, y = data
    return x, y


def _n_examples(train_loader: Iterable, dict_key_x: str, dict_key_y: str) -> int:
    """N: ``len(train_loader.dataset)`` when the loader has one, else one pass counting the targets."""
    dataset = getattr(train_loader, "dataset", None)
    n = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else sum(
        len(_batch(data, dict_key_x, dict_key_y)[1]) for data in train_loader)
    if n == 0:
        raise ValueError("train_loader yielded no examples")
    return n


def examples_digest(train_loader: Iterable, dict_key_x: str, dict_key_y: str) -> dict[str, Any]:
    """An order-independent fingerprint of the training examples: N and the sum modulo 2^64 of one hash per example.

    Each example's hash covers the bytes of its inputs and its target together (a relabelled example changes
    it), so the digest does not depend on the order of the examples or their batching (a shuffling loader) and
    changes with any value. Cost: one pass over the loader and one 8-byte blake2b per example.
    """
    total, n = 0, 0
    for data in train_loader:
        x, y = _batch(data, dict_key_x, dict_key_y)
        rows = [t.detach().cpu().contiguous().view(torch.uint8).reshape(len(y), -1).numpy()
                for t in [*tensor_leaves(as_model_inputs(x, "inputs")), y]]
        for i in range(len(y)):
            h = hashlib.blake2b(digest_size=8)
            for r in rows:
                h.update(r[i].tobytes())
            total = (total + int.from_bytes(h.digest(), "little")) % 2 ** 64
        n += len(y)
    return {"examples": n, "sum_of_hashes": f"{total:016x}"}


def _name(value: Any) -> str | None:
    return None if value is None else f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', value)}"


def marglik_training(
    model: nn.Module,
    train_loader: Iterable,
    likelihood: Likelihood | str = "classification",
    hessian_structure: str = "kron",
    curvature: str = "ggn",
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: dict[str, Any] | None = None,
    scheduler_cls: Callable[..., Any] | None = None,
    scheduler_kwargs: dict[str, Any] | None = None,
    n_epochs: int = 300,
    lr_hyp: float = 0.1,
    prior_structure: PriorStructure | str = "layerwise",
    n_epochs_burnin: int = 0,
    n_hypersteps: int = 10,
    marglik_frequency: int = 1,
    prior_prec_init: float = 1.0,
    sigma_noise_init: float = 1.0,
    temperature: float = 1.0,
    fix_sigma_noise: bool = False,
    progress_bar: bool = False,
    enable_backprop: bool = False,
    dict_key_x: str = "input",
    dict_key_y: str = "target",
    laplace_cls: type[Laplace] = Laplace,
    checkpoint: str | os.PathLike | None = None,
) -> tuple[Laplace, nn.Module, list[float], list[float]]:
    """Train ``model`` and its prior precision (and noise) jointly by the Laplace evidence; see the module docstring.

    Args:
        model: the network to train (returns logits or regression outputs); trained in place.
        train_loader: (x, y) batches or dicts (read with ``dict_key_x`` / ``dict_key_y``).
        likelihood: "classification" or "regression".
        hessian_structure: the Laplace's structure ("full", "diag", "kron", ...).
        curvature: "ggn", "ggn_mc" or "ef".
        optimizer_cls: the network's optimiser class (default Adam).
        optimizer_kwargs: its keyword arguments; a ``weight_decay`` is dropped (the prior is the weight decay).
        scheduler_cls: an optional learning-rate scheduler class, stepped after every batch.
        scheduler_kwargs: its keyword arguments.
        n_epochs: training epochs.
        lr_hyp: Adam's step size on the log hyperparameters.
        prior_structure: "scalar", "layerwise" (one per parameter tensor) or "diag" (one per parameter).
        n_epochs_burnin: epochs before the first evidence estimate.
        n_hypersteps: hyperparameter steps per evidence estimate.
        marglik_frequency: estimate the evidence every this many epochs.
        prior_prec_init: the starting delta.
        sigma_noise_init: the starting sigma (regression).
        temperature: laplace-torch's likelihood temperature; only 1.0 is supported.
        fix_sigma_noise: keep sigma at ``sigma_noise_init`` (regression).
        progress_bar: print one line per evidence estimate (loss, negative log evidence).
        enable_backprop: laplace-torch's differentiable predictive; only False is supported.
        dict_key_x: the input's key in dict batches.
        dict_key_y: the target's key in dict batches.
        laplace_cls: the Laplace class to build (a subclass of posthoc's ``Laplace``).
        checkpoint: a file to write after every epoch and to resume from (see the module docstring).

    Returns:
        (la, model, margliks, losses): the Laplace fitted at the best weights and hyperparameters, the model (with
        those weights), the negative log evidence after every hyperparameter step, and the mean training loss of
        every epoch.

    Raises:
        NotImplementedError: ``temperature`` other than 1 or ``enable_backprop``.
        ValueError: bad counts or options, an empty loader.
        posthoc.utils.checkpoint.CheckpointError: a checkpoint of another computation, or a damaged one.
    """
    kind = check_supported(check_choice(likelihood, Likelihood, "likelihood"), (Likelihood.CLASSIFICATION, Likelihood.REGRESSION), "marglik_training")
    if temperature != 1.0:
        raise NotImplementedError("temperature != 1 is not supported by posthoc's Laplace yet (issue 18)")
    if enable_backprop:
        raise NotImplementedError("enable_backprop (a predictive differentiable in x) is not supported yet (issue 18)")
    for value, name in ((n_epochs, "n_epochs"), (n_hypersteps, "n_hypersteps"), (marglik_frequency, "marglik_frequency")):
        check_positive_int(value, name)
    if not (prior_prec_init > 0 and sigma_noise_init > 0 and lr_hyp > 0):
        raise ValueError("prior_prec_init, sigma_noise_init and lr_hyp must be > 0")
    optimizer_kwargs = dict(optimizer_kwargs or {})
    optimizer_kwargs.pop("weight_decay", None)  # the prior is the weight decay, tuned by the evidence
    subset = ParameterSubset(model, "all")
    size = {PriorStructure.SCALAR: 1, PriorStructure.LAYERWISE: len(subset.blocks),
            PriorStructure.DIAG: subset.n_params}[prior_structure_choice(prior_structure)]
    log_prior = torch.full((size,), math.log(prior_prec_init), dtype=subset.dtype, device=subset.device,
                           requires_grad=True)
    tune_sigma = kind is Likelihood.REGRESSION and not fix_sigma_noise
    log_sigma = torch.tensor(math.log(sigma_noise_init), dtype=subset.dtype, device=subset.device,
                             requires_grad=tune_sigma)
    hyper_optimizer = torch.optim.Adam([log_prior, log_sigma] if tune_sigma else [log_prior], lr=lr_hyp)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_cls(params, **optimizer_kwargs)
    scheduler = scheduler_cls(optimizer, **(scheduler_kwargs or {})) if scheduler_cls is not None else None
    criterion = nn.CrossEntropyLoss() if kind is Likelihood.CLASSIFICATION else nn.MSELoss()

    def build() -> Laplace:
        sigma = log_sigma.detach().exp() if kind is Likelihood.REGRESSION else 1.0
        return laplace_cls(model, kind, subset_of_weights="all", hessian_structure=hessian_structure,
                           prior_precision=log_prior.detach().exp(), sigma_noise=sigma, curvature=curvature,
                           dict_key_x=dict_key_x, dict_key_y=dict_key_y, progress=False)

    n_total = _n_examples(train_loader, dict_key_x, dict_key_y)
    margliks: list[float] = []
    losses: list[float] = []
    best: tuple[float, dict[str, Any], torch.Tensor, torch.Tensor] | None = None
    start = 1
    fingerprint: dict[str, Any] = {}
    if checkpoint is not None:
        check_writable(Path(checkpoint).parent, "marglik_training checkpoint")
        fingerprint = {
            "settings": {"likelihood": kind.value, "hessian_structure": str(hessian_structure),
                         "curvature": str(curvature), "optimizer": _name(optimizer_cls),
                         "optimizer_kwargs": repr(sorted(optimizer_kwargs.items())),
                         "scheduler": _name(scheduler_cls), "scheduler_kwargs": repr(sorted((scheduler_kwargs or
                                                                                             {}).items())),
                         "n_epochs": n_epochs, "lr_hyp": lr_hyp, "prior_structure": str(prior_structure),
                         "n_epochs_burnin": n_epochs_burnin, "n_hypersteps": n_hypersteps,
                         "marglik_frequency": marglik_frequency, "prior_prec_init": prior_prec_init,
                         "sigma_noise_init": sigma_noise_init, "fix_sigma_noise": fix_sigma_noise,
                         "dict_keys": [dict_key_x, dict_key_y], "laplace_cls": _name(laplace_cls)},
            "initial_weights": module_digest(model),
        }
        rng = torch.get_rng_state()  # the digest's pass draws a shuffling loader's order: training must not see it
        fingerprint["train_data"] = examples_digest(train_loader, dict_key_x, dict_key_y)
        torch.set_rng_state(rng)
        if os.path.exists(checkpoint):
            state = load_checkpoint(checkpoint, fingerprint, CHECKPOINT_KIND)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            hyper_optimizer.load_state_dict(state["hyper_optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            with torch.no_grad():
                log_prior.copy_(state["log_prior"])
                log_sigma.copy_(state["log_sigma"])
            margliks, losses = list(state["margliks"]), list(state["losses"])
            if state["best"] is not None:
                score, weights, prior, noise = state["best"]
                best = (float(score), weights, prior, noise)
            torch.set_rng_state(state["torch_rng"])
            start = int(state["epoch"]) + 1
    for epoch in range(start, n_epochs + 1):
        model.train()
        total, n_data = 0.0, 0
        delta = per_parameter(log_prior.detach().exp(), subset)
        factor = 1.0 if kind is Likelihood.CLASSIFICATION else 0.5 / float(log_sigma.detach().exp()) ** 2
        for data in train_loader:
            x, y = _batch(data, dict_key_x, dict_key_y)
            optimizer.zero_grad()
            theta = torch.nn.utils.parameters_to_vector(params)
            loss = criterion(model(x), y) + 0.5 * (delta * theta * theta).sum() / n_total / factor
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += float(loss.detach()) * len(y)
            n_data += len(y)
        losses.append(total / n_data)
        if epoch % marglik_frequency != 0 or epoch < n_epochs_burnin:
            if checkpoint is not None:
                _save(checkpoint, fingerprint, epoch, model, optimizer, hyper_optimizer, scheduler, log_prior,
                      log_sigma, margliks, losses, best)
            continue
        la = build().fit(train_loader)
        for _ in range(n_hypersteps):
            hyper_optimizer.zero_grad()
            sigma = log_sigma.exp() if tune_sigma else None
            evaluated = (log_prior.detach().clone(), log_sigma.detach().clone())  # where margliks[-1] is taken
            neg_evidence = -la.log_marginal_likelihood(log_prior.exp(), sigma)
            neg_evidence.backward()
            hyper_optimizer.step()
            margliks.append(float(neg_evidence.detach()))
        if best is None or margliks[-1] < best[0]:
            best = (margliks[-1], copy.deepcopy(model.state_dict()), *evaluated)
        if checkpoint is not None:
            _save(checkpoint, fingerprint, epoch, model, optimizer, hyper_optimizer, scheduler, log_prior, log_sigma,
                  margliks, losses, best)
        if progress_bar:
            print(f"marglik_training epoch {epoch}: loss {losses[-1]:.4g}, -log evidence {margliks[-1]:.4g}")
    if best is not None:
        model.load_state_dict(best[1])
        with torch.no_grad():
            log_prior.copy_(best[2])
            log_sigma.copy_(best[3])
    return build().fit(train_loader), model, margliks, losses


def _save(path: str | os.PathLike, fingerprint: dict[str, Any], epoch: int, model: nn.Module,
          optimizer: torch.optim.Optimizer, hyper_optimizer: torch.optim.Optimizer, scheduler: Any,
          log_prior: torch.Tensor, log_sigma: torch.Tensor, margliks: list[float], losses: list[float],
          best: tuple[float, dict[str, Any], torch.Tensor, torch.Tensor] | None) -> None:
    """Everything the loop carries from one epoch to the next (see the module docstring)."""
    save_checkpoint(path, {
        "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "hyper_optimizer": hyper_optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "log_prior": log_prior.detach().clone(), "log_sigma": log_sigma.detach().clone(),
        "margliks": list(margliks), "losses": list(losses), "best": None if best is None else list(best),
        "torch_rng": torch.get_rng_state()}, fingerprint, CHECKPOINT_KIND)
