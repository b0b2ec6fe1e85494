"""Locating the last layer of a network and classifying what follows it (its "tail").

Used by :class:`posthoc.network.subset.ParameterSubset` for ``subset_of_weights="last_layer"``; the module
docstring there describes the three tails (identity, linear, rerun) and their cost.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from posthoc.network.inputs import ModelInputs, floating_leaves, tensor_leaves


class Tail(str, Enum):
    """How the covered function of ``last_layer`` continues after the last Linear.

    See :mod:`posthoc.network.subset` for what each tail means and costs.
    """

    IDENTITY = "identity"
    LINEAR = "linear"
    RERUN = "rerun"


def named_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of ``model`` by its name in ``model.named_modules()``, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def last_linear_on_path(model: nn.Module, x: ModelInputs, call: Callable[[ModelInputs], torch.Tensor]) -> str:
    """The name of the last nn.Linear, in call order, whose output ``call(x)`` (the model's output) depends on.

    Forward hooks replace each Linear's output by a leaf tensor; autograd says which leaves the output reaches.
    Cost: one forward and one backward pass on ``x``.

    Raises:
        ValueError: no nn.Linear feeds the output.
    """
    linears = {id(m): n for n, m in named_linears(model).items()}
    calls: list[tuple[str, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        calls.append((linears[id(module)], leaf))
        return leaf

    handles = [m.register_forward_hook(hook) for m in model.modules() if id(m) in linears]
    try:
        out = call(x)
    finally:
        for handle in handles:
            handle.remove()
    on_path: list[str] = []
    if isinstance(out, torch.Tensor) and out.requires_grad and calls:
        grads = torch.autograd.grad(out, [leaf for _, leaf in calls], torch.ones_like(out), allow_unused=True)
        on_path = [name for (name, _), g in zip(calls, grads, strict=True) if g is not None]
    if not on_path:
        raise ValueError("subset_of_weights='last_layer': no nn.Linear of the model feeds its output in a "
                         "forward pass; use subset_of_weights='all'")
    return on_path[-1]


def classify_tail(model: nn.Module, name: str, layer: nn.Module, x: ModelInputs,
                  call: Callable[[ModelInputs], torch.Tensor]) -> tuple[Tail, torch.Tensor | None]:
    """The tail after the nn.Linear ``layer`` (called ``name``) on inputs ``x`` (B >= 2) and its matrix (C, Z).

    The matrix is given when the tail is linear (see :class:`Tail`); ``call(x)`` is the model's output.
    Cost: up to three forward passes and C + 2 backward passes on ``x``.

    Raises:
        ValueError: the layer runs more than once per forward pass; the output does not depend on it; its
            weights are tied to another use; the output depends on parameters that require grad other than
            through the layer.
    """
    seen: list[torch.Tensor] = []
    layer_inputs: list[torch.Tensor] = []
    replacement: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        layer_inputs.append(args[0])
        seen.append(output)
        if replacement:
            return replacement[0]
        leaf = output.detach().requires_grad_(True)
        seen[-1] = leaf
        return leaf

    def run(inputs: ModelInputs) -> torch.Tensor:
        seen.clear()
        handle = layer.register_forward_hook(hook)
        try:
            return call(inputs)
        finally:
            handle.remove()

    x_leaf = tree_map(lambda t: t.detach().clone().requires_grad_(True)
                      if isinstance(t, torch.Tensor) and t.is_floating_point() else t, x)
    input_leaves = floating_leaves(x_leaf)
    out = run(x_leaf)
    if len(seen) != 1:
        raise ValueError(f"the last layer {name!r} runs {len(seen)} times in one forward pass; the last-layer "
                         "Laplace needs a layer applied once. Pass last_layer_name= naming another nn.Linear, "
                         "or use subset_of_weights='all'")
    z = seen[0]
    if not isinstance(out, torch.Tensor) or out.ndim < 2 or not out.requires_grad:  # (B, C) or (B, ..., C)
        if isinstance(out, torch.Tensor) and out.ndim >= 2:
            raise ValueError(f"the model's output does not depend on the layer {name!r}; pass last_layer_name= "
                             "naming the nn.Linear that computes the output")
        return Tail.IDENTITY, None  # not (B, ...) outputs: the estimator's output check names the problem
    own = {id(p) for p in layer.parameters()}
    others = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    wrt = [p for _, p in others] + input_leaves
    grads = torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True, retain_graph=True) if wrt else []
    tied = [n for (n, p), g in zip(others, grads[:len(others)], strict=True) if g is not None and id(p) in own]
    mine = [(n, p) for n, p in others if id(p) in own]
    if mine and layer_inputs[0].requires_grad:  # the layer's own weights also shape its input (e.g. an embedding)
        before = torch.autograd.grad(layer_inputs[0], [p for _, p in mine], torch.ones_like(layer_inputs[0]),
                                     allow_unused=True, retain_graph=True)
        tied += [n for (n, _), g in zip(mine, before, strict=True) if g is not None]
    if tied:
        raise ValueError(f"the last layer {name!r}'s parameters {tied} are also used elsewhere in the forward pass "
                         "(tied weights); the last-layer Laplace cannot cover them: use subset_of_weights='all'")
    after = [n for (n, p), g in zip(others, grads[:len(others)], strict=True) if g is not None and id(p) not in own]
    if after:
        shown = ", ".join(repr(n) for n in after[:4]) + (f" and {len(after) - 4} more" if len(after) > 4 else "")
        raise ValueError(
            f"the model's output depends on parameters {shown} other than through the last nn.Linear {name!r} "
            "(a layer with weights after it, or a path around it), so the last-layer Laplace would silently "
            "treat part of the network's last layers as fixed. Pass last_layer_name= naming the nn.Linear after "
            "which only parameter-free operations follow, freeze those parameters (requires_grad_(False)) to "
            "treat them as constants, or use subset_of_weights='all' or 'subnetwork'"
        )
    if any(g is not None for g in grads[len(others):]):
        return Tail.RERUN, None  # the output reads the input other than through the layer
    if out is z:
        return Tail.IDENTITY, None
    if len(input_leaves) != len(tensor_leaves(x)) or out.ndim > 2:  # outputs with positions: no matrix either
        # integer inputs (token ids, masks) can steer the tail without a gradient, e.g. GPT-2 pools the last
        # non-pad token: a map read off this batch need not hold for the next, so the tail is re-run
        return Tail.RERUN, None
    batch = out.shape[0]
    if z.shape[0] != batch:  # the layer's rows are not the examples (e.g. both items of a pair): no per-example map
        return Tail.RERUN, None
    rows = [torch.autograd.grad(out[0, c], z, retain_graph=True, allow_unused=True)[0] for c in range(out.shape[1])]
    if any(r is None for r in rows):
        return Tail.RERUN, None
    matrix = torch.stack([r[0].reshape(-1) for r in rows]).detach()  # (C, Z): d out[0] / d z[0]
    # linear and the same map for every example: exact on the layer's own output and on a random one
    probe = torch.randn(z.shape, generator=torch.Generator().manual_seed(0), dtype=z.dtype).to(z.device)
    replacement.append(probe)
    with torch.no_grad():
        out_probe = run(x)
    tol = 1e3 * torch.finfo(z.dtype).eps
    for zz, oo in ((z.detach(), out.detach()), (probe, out_probe)):
        flat = zz.reshape(batch, -1)
        scale = float((flat.abs() @ matrix.abs().T).max()) + torch.finfo(z.dtype).tiny
        if oo.shape != (batch, matrix.shape[0]) or float((oo - flat @ matrix.T).abs().max()) > tol * scale:
            return Tail.RERUN, None
    return Tail.LINEAR, matrix
