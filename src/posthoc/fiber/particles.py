"""How the fiber code evaluates the covered function at K particles: one vmap over them, or a loop.

The walk, the projection and the predictive evaluate f(X; theta_k) and its JVPs/VJPs at K parameter vectors on
the same inputs, vectorised over the particles with ``torch.func.vmap``. vmap cannot batch Python control flow
on a batched tensor's value (``if h.sum() > 0:``, ``.item()``) nor an operation whose output shape depends on it
(``h[h > 0]``, ``nonzero``). Under a vmap over particles only what depends on theta is batched: Hugging Face's
attention-mask code, which reads the mask's values (``padding_mask.all()``, :mod:`posthoc.network.probes`),
reads inputs shared by all particles, so it vmaps (unlike a vmap over examples, where the mask is batched).

:func:`posthoc.network.probes.reads_values_computed_from` finds out by watching one forward pass: it marks theta
and everything computed from it, and reports whether a value read or a data-dependent shape touched a marked tensor. Only then do the
particles go through a Python loop (:func:`map_particles`): K calls instead of one vectorised call, the same
results.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import vmap

from posthoc.curvature.jacobians import forward_mode_attention
from posthoc.network.inputs import ModelInputs, take
from posthoc.network.probes import reads_values_computed_from
from posthoc.network.subset import ParameterSubset


def vectorises_over_particles(subset: ParameterSubset, inputs: ModelInputs) -> bool:
    """Whether the covered function on ``inputs`` may be vmapped over parameter vectors (module docstring).

    Probed at theta* on the first example. Cost: one forward pass of one example.
    """
    first = take(inputs, 0, 1)
    return not reads_values_computed_from(lambda theta: subset.forward(first, theta), subset.theta_map)


def map_particles(fn: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...], vectorise: bool = True,
                  randomness: str = "error") -> torch.Tensor:
    """``fn`` applied to the K rows of each of ``tensors`` (K, ...), results stacked: (K, ...).

    One ``vmap`` call (``randomness`` as vmap's), or, when ``vectorise`` is False, a loop of K calls. Attention
    runs on SDPA's math kernel (:func:`posthoc.curvature.jacobians.forward_mode_attention`): it has batching
    rules and forward-mode derivatives, where the fused CPU kernel of Hugging Face's default "sdpa" attention has
    neither (vmap would loop over it with a warning, a JVP would fail); the same attention up to round-off.
    """
    with forward_mode_attention():
        if vectorise:
            return vmap(fn, randomness=randomness)(*tensors)
        return torch.stack([fn(*rows) for rows in zip(*tensors, strict=True)])
