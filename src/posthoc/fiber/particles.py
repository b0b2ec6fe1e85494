"""How the fiber code evaluates the covered function at K particles: one vmap over them, or a loop.

The walk, the projection and the predictive evaluate f(X; theta_k) and its JVPs/VJPs at K parameter vectors on
the same inputs, vectorised over the particles with ``torch.func.vmap``. vmap cannot batch Python control flow
on a batched tensor's value (``if h.sum() > 0:``, ``.item()``) nor an operation whose output shape depends on it
(``h[h > 0]``, ``nonzero``). Under a vmap over particles only what depends on theta is batched: Hugging Face's
attention-mask code, which reads the mask's values (``padding_mask.all()``, :mod:`posthoc.network.probes`),
reads inputs shared by all particles, so it vmaps (unlike a vmap over examples, where the mask is batched).

:func:`reads_parameter_values` finds out by watching one forward pass: it marks theta and everything computed
from it, and reports whether a value read or a data-dependent shape touched a marked tensor. Only then do the
particles go through a Python loop (:func:`map_particles`): K calls instead of one vectorised call, the same
results.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.func import vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from posthoc.curvature.jacobians import forward_mode_attention
from posthoc.network.inputs import ModelInputs, take
from posthoc.network.subset import ParameterSubset


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


class _DependentReads(TorchDispatchMode):
    """Marks the tensors computed from a source tensor; counts the value reads and data-dependent shapes on them."""

    def __init__(self, source: torch.Tensor) -> None:
        super().__init__()
        self.marked = WeakTensorKeyDictionary()
        self.marked[source] = True
        self.count = 0

    def _breaks_vmap(self, func: Any, args: tuple, kwargs: dict) -> bool:
        if torch.Tag.data_dependent_output in func.tags or func is torch.ops.aten.is_nonzero.default:
            return True  # .item(), bool(t), int(t): a value into Python
        if torch.Tag.dynamic_output_shape not in func.tags:
            return False
        if func is torch.ops.aten.index.Tensor:  # integer indices batch fine; a boolean mask gives a dynamic shape
            return any(t.dtype == torch.bool and t in self.marked for t in _tensors(args[1:]))
        return True

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        dependent = any(t in self.marked for t in _tensors((args, kwargs)))
        if dependent and self._breaks_vmap(func, args, kwargs):
            self.count += 1
        out = func(*args, **kwargs)
        if dependent:  # in-place operations return the tensor they changed, so it is marked too
            for t in _tensors(out):
                self.marked[t] = True
        return out


def reads_parameter_values(forward: Callable[[torch.Tensor], Any], theta: torch.Tensor) -> bool:
    """Whether ``forward(theta)`` reads a value computed from ``theta`` into Python, or shapes a tensor by one.

    Such a function cannot be vmapped over several theta. Reads of tensors that do not depend on ``theta`` (an
    attention mask among the inputs) do not count. Conservative: indexing by a 0-dim tensor (``t[i]``) reads ``i``
    and counts, though vmap has a rule for it (the particles are then looped: slower, the same result). Cost: one call of ``forward`` (without autograd) with a Python
    hook on every operator it dispatches.
    """
    source = theta.detach().clone()
    with torch.no_grad(), _DependentReads(source) as mode:
        forward(source)
    return mode.count > 0


def vectorises_over_particles(subset: ParameterSubset, inputs: ModelInputs) -> bool:
    """Whether the covered function on ``inputs`` may be vmapped over parameter vectors (module docstring).

    Probed at theta* on the first example. Cost: one forward pass of one example.
    """
    first = take(inputs, 0, 1)
    return not reads_parameter_values(lambda theta: subset.forward(first, theta), subset.theta_map)


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
