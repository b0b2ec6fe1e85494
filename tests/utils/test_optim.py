"""posthoc.utils.optim.maximise: Adam ascent on a few hyperparameters."""

import math

import pytest
import torch

from posthoc.utils.optim import maximise


def test_maximise_finds_the_maximum_of_a_concave_objective():
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.5, -0.5], dtype=torch.float64)
    maximise(lambda: -(x - target).square().sum(), [x], n_steps=500, lr=0.05, what="test objective")
    torch.testing.assert_close(x.detach(), target, atol=1e-3, rtol=0)


def test_maximise_stops_on_a_non_finite_objective():
    x = torch.zeros(1, requires_grad=True)
    with pytest.raises(FloatingPointError, match="the evidence became non-finite; lower lr"):
        maximise(lambda: (x * math.inf).sum(), [x], n_steps=3, lr=0.1, what="evidence")
