"""Running a network as the deterministic function the uncertainty estimates are about."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode inside the block, then give every submodule back its own train/eval flag.

    The posterior and every predictive are about the eval-mode network (Dropout off, BatchNorm on its running
    statistics), whatever mode the caller left the model in; a model in train mode would make predictions
    random and would update BatchNorm's running statistics (changing the weights the posterior was fitted at).
    Restoring each submodule's flag (not just the top-level one) keeps mixed modes, e.g. a frozen body in eval
    and a head in train, exactly as they were. Cost: one pass over ``model.modules()``; none when already in eval.
    Nested uses are cheap (the inner one finds everything in eval).
    """
    modes = [(module, module.training) for module in model.modules()]
    if not any(training for _, training in modes):
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
