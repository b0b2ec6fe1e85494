"""Diagonal-mode pooling rules (``pooling=``) against the exact covariance of linear networks (float64).

On a linear network the full mode is exact (every layer is linear in weights and inputs, the weights of different
layers independent), so it is the reference: "independent" is exact when the pooled entries are uncorrelated,
"correlated" when they are perfectly correlated, and the exact pooled variance never exceeds "correlated" (the
Cauchy-Schwarz bound).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from posthoc import Streamlined
from posthoc.streamlined import PoolingRule

DTYPE = torch.float64


class MeanOverPositions(nn.Module):
    """(B, C, H, W) -> (B, C) by a traced ``mean`` (or ``sum``) reduction, as a user's network would write it."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if self.op == "mean" else x.sum(dim=(2, 3))


def _pool(kind: str) -> nn.Module:
    """(B, C, H, W) -> (B, C·k): AdaptiveAvgPool2d, AvgPool2d, or a traced mean / sum over the positions."""
    return {"adaptive": lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            "avg": lambda: nn.Sequential(nn.AvgPool2d(3), nn.Flatten()),
            "mean": lambda: MeanOverPositions("mean"), "sum": lambda: MeanOverPositions("sum")}[kind]()


def _network(pool: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), _pool(pool)).to(DTYPE)  # the outputs are the pooled entries


def _variances(model: nn.Module, which: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {n: torch.rand(p.shape, generator=g, dtype=DTYPE) * 1e-2 for n, p in model.named_parameters()
            if n.startswith("0.") and (which == "all" or n.endswith(which))}


def _pooled_variance(model: nn.Module, var: dict, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
    return Streamlined(model, weight_var=var, **kwargs).predict(x).var


POOLS = ["adaptive", "avg", "mean", "sum"]


@pytest.mark.parametrize("pool", POOLS)
def test_correlated_is_exact_when_the_pooled_positions_are_equal(pool):
    """A constant image: every position of the conv output is the same random variable (perfectly correlated)."""
    model = _network(pool)
    x = torch.ones(2, 2, 8, 8, dtype=DTYPE) * torch.tensor([0.7, -1.3], dtype=DTYPE).view(1, 2, 1, 1)
    var = _variances(model, "all")
    exact = _pooled_variance(model, var, x, activation_covariance="full")
    correlated = _pooled_variance(model, var, x, pooling="correlated")
    torch.testing.assert_close(correlated, exact, rtol=1e-10, atol=0)
    independent = _pooled_variance(model, var, x)
    assert (independent < 0.5 * exact).all()  # the authors' rule under-counts it (by up to the pool's size)


@pytest.mark.parametrize("pool", POOLS)
def test_correlated_bounds_the_exact_variance_and_is_exact_for_a_shared_bias(pool):
    model = _network(pool)
    x = torch.randn(3, 2, 8, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    var = _variances(model, "all")
    exact = _pooled_variance(model, var, x, activation_covariance="full")
    correlated = _pooled_variance(model, var, x, pooling="correlated")
    independent = _pooled_variance(model, var, x)
    assert (exact <= correlated * (1 + 1e-12)).all()
    assert not torch.allclose(correlated, exact) and not torch.allclose(independent, exact)
    bias_only = _variances(model, "bias")  # the conv bias is one random number per channel, at every position
    torch.testing.assert_close(_pooled_variance(model, bias_only, x, pooling="correlated"),
                               _pooled_variance(model, bias_only, x, activation_covariance="full"), rtol=1e-10, atol=0)


@pytest.mark.parametrize("pool", POOLS)
def test_independent_is_exact_for_independent_input_noise(pool):
    """Deterministic weights and independent noise on each input entry, pooled directly (a 3x3 conv first would
    correlate neighbouring positions through its overlapping windows)."""
    torch.manual_seed(0)
    identity = nn.Conv2d(2, 2, 1, bias=False)  # deterministic; keeps each position's noise at its position
    nn.init.dirac_(identity.weight)
    model = nn.Sequential(identity, _pool(pool)).to(DTYPE)
    x = torch.randn(2, 2, 6, 6, dtype=DTYPE)
    full = Streamlined(model, weight_var={}, activation_covariance="full").predict(x, input_var=0.05).var
    torch.testing.assert_close(Streamlined(model, weight_var={}).predict(x, input_var=0.05).var, full,
                               rtol=1e-10, atol=0)
    correlated = Streamlined(model, weight_var={}, pooling="correlated").predict(x, input_var=0.05).var
    assert (correlated > 2 * full).all()


def test_pooling_option_is_checked_and_recorded():
    model = _network("mean")
    with pytest.raises(ValueError, match="pooling.*correlated"):
        Streamlined(model, weight_var=_variances(model, "all"), pooling="shared")
    sp = Streamlined(model, weight_var=_variances(model, "all"), pooling=PoolingRule.CORRELATED)
    assert sp.bench_info()["pooling"] == "correlated"
    assert Streamlined(model, weight_var=_variances(model, "all")).pooling is PoolingRule.INDEPENDENT


def test_streamlined_knows_no_model_and_register_graph_is_deprecated():
    """posthoc.streamlined imports none of posthoc's networks; their blocks register rules like a user's would."""
    code = ("import sys, posthoc, posthoc.streamlined; "
            "assert not [m for m in sys.modules if m.startswith('posthoc.models')], 'posthoc.models imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    from posthoc.streamlined import RULES, register_graph
    from posthoc.streamlined.rules import rule_key

    class Block(nn.Module):
        def forward(self, x):
            return x

    with pytest.warns(DeprecationWarning, match="register_rule"):
        register_graph(Block)(lambda module, state, ctx, last: state)
    del RULES[rule_key(Block)]


def test_a_model_without_weights_keeps_the_inputs_dtype():
    """No parameter to take a dtype from: float64 inputs are propagated in float64 (they were cast to float32)."""
    model = nn.Sequential(nn.AvgPool2d(2), nn.Flatten())
    x = torch.randn(2, 2, 4, 4, dtype=DTYPE)
    pred = Streamlined(model, weight_var={}).predict(x, input_var=0.05)
    assert pred.mean.dtype == DTYPE
    torch.testing.assert_close(pred.mean, model(x), rtol=0, atol=0)
    # four independent entries of variance 0.05 averaged: 0.05 / 4 exactly, up to float64 round-off
    torch.testing.assert_close(pred.var, torch.full_like(pred.var, 0.05 / 4), rtol=1e-14, atol=0)
