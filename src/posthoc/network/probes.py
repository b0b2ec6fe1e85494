"""Whether a forward pass can run under ``torch.func.vmap`` over examples, found by watching one run.

vmap batches tensor operations, but not Python control flow on tensor values: ``if mask.all():``,
``int(t)``, ``t.item()``, ``t.tolist()`` all read a value into Python, which under vmap is one value per
example and raises. Hugging Face transformers (5.x) does this in its attention-mask construction: with an
``attention_mask`` its mask builders test ``padding_mask.all()`` to skip the mask when nothing is padded (so
that SDPA may pick a fused kernel), for every attention implementation ("eager" included), so stock BERT and
GPT-2 with masks cannot be vmapped over examples.

:func:`reads_tensor_values` runs a function once under a dispatch mode that records those reads (every one
ends in ``aten._local_scalar_dense``); per-example Jacobians then loop over examples instead of vmapping
(:func:`posthoc.curvature.jacobians.per_example_jacobians`). The test is conservative: a forward pass that
reads a value that does not depend on the input (a buffer) also counts, which costs speed, never correctness.
:func:`reads_values_computed_from` is the precise probe, counting only reads of values computed from one tensor
(the fiber walk's vmap over parameter vectors uses it).
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary


class ExampleRoute(str, Enum):
    """How per-example Jacobians are taken."""

    AUTO = "auto"  # vmap unless the forward pass reads tensor values (reads_tensor_values)
    VMAP = "vmap"  # one vectorised call over the examples
    LOOP = "loop"  # a Python loop over examples, one forward pass of one example each


_VALUE_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
                torch.ops.aten.is_nonzero.default)


class _ValueReads(TorchDispatchMode):
    """Counts the operators that read a tensor's value into Python."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in _VALUE_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def reads_tensor_values(fn: Callable[[], Any]) -> bool:
    """Whether calling ``fn()`` reads a tensor's value into Python (``.item()``, ``bool(t)``, ``if t:``).

    Such a function cannot be vmapped over inputs the values depend on. Cost: one call of ``fn`` with a
    Python hook on every operator it dispatches.
    """
    with _ValueReads() as mode:
        fn()
    return mode.count > 0


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


def reads_values_computed_from(forward: Callable[[torch.Tensor], Any], source: torch.Tensor) -> bool:
    """Whether ``forward(source)`` reads a value computed from ``source`` into Python, or shapes a tensor by one.

    Such a function cannot be vmapped over ``source`` (the fiber walk's parameter vectors,
    :mod:`posthoc.fiber.particles`). Reads of tensors that do not depend on ``source`` (an attention mask among the
    inputs) do not count, unlike :func:`reads_tensor_values`. Conservative: indexing by a 0-dim tensor (``t[i]``)
    reads ``i`` and counts, though vmap has a rule for it (the particles are then looped: slower, the same result).
    Cost: one call of ``forward`` (without autograd) with a Python hook on every operator it dispatches.
    """
    marked = source.detach().clone()
    with torch.no_grad(), _DependentReads(marked) as mode:
        forward(marked)
    return mode.count > 0
