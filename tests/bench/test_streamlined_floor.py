"""benchmarks/streamlined_floor.py: its by-hand propagation is Streamlined's diagonal mode, so the floor it times is real."""

import pytest
import torch
from benchmark_scripts import benchmark_module

from posthoc.models import MLP
from posthoc.streamlined import Streamlined


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("streamlined_floor") as module:
        yield module


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_by_hand_equals_streamlined(bench, activation):
    torch.manual_seed(0)
    model = MLP(784, (8, 6, 7), 5, activation).double().eval()
    variances = {n: torch.rand_like(p) * 1e-2 for n, p in model.named_parameters()}
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    mean, cov = bench.by_hand(model, variances, activation)(x)
    pred = Streamlined(model, weight_var=variances).predict(x)
    torch.testing.assert_close(mean, model(x).detach(), rtol=0, atol=0)
    torch.testing.assert_close(cov, pred.cov, rtol=1e-12, atol=1e-15)


def test_unknown_activation_raises(bench):
    with pytest.raises(ValueError, match="unknown activation"):
        bench.activation_and_slope("gelu")
