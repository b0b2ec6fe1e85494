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
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


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
