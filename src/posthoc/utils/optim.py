"""Guarded optimizer steps, and gradient ascent of a scalar objective over a few unconstrained hyperparameters.

The hyperparameters are e.g. log delta and log sigma.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm


def guarded_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, error: str) -> float:
    """Backward and one optimizer step on ``loss`` (gradients zeroed by the caller); returns the loss.

    Raises FloatingPointError(``error``) instead when the loss is not finite.
    """
    if not torch.isfinite(loss):
        raise FloatingPointError(error)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def maximise(objective: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], n_steps: int, lr: float,
             what: str, progress: bool = False) -> None:
    """``n_steps`` Adam steps on -objective() over ``params`` (leaf tensors, updated in place).

    Raises FloatingPointError naming ``what`` as soon as the objective stops being finite.
    """
    optimizer = torch.optim.Adam(list(params), lr=lr)
    for _ in tqdm(range(n_steps), desc=what, disable=not progress, leave=False):
        optimizer.zero_grad()
        guarded_step(optimizer, -objective(), f"the {what} became non-finite; lower lr")
