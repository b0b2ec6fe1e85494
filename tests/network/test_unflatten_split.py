"""ParameterSubset.unflatten: the blocks are views of theta from one torch.split.

A slice per block would send each block's gradient through its own zero (P,) vector in the backward (cost: number
of blocks x P per backward, x K under vmap: 36 s per example for the per-example VJPs of a 4.9 M-weight ResNet);
the split's backward concatenates once.
"""

from __future__ import annotations

import torch
from torch import nn

from posthoc.network.subset import ParameterSubset


def test_unflatten_gives_the_parameters_as_views_of_one_split():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    subset = ParameterSubset(model, "all")
    theta = subset.theta_map.clone().requires_grad_(True)
    params = subset.unflatten(theta)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(params[name], parameter.detach(), rtol=0, atol=0)
    sources = {piece.grad_fn.next_functions[0][0] for piece in params.values()}  # view <- split
    assert len(sources) == 1 and "Split" in type(sources.pop()).__name__
    (grad,) = torch.autograd.grad(sum(p.sum() for p in params.values()), theta)
    torch.testing.assert_close(grad, torch.ones_like(theta), rtol=0, atol=0)
