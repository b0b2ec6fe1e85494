"""benchmarks/streamlined_agreement_linear.py: its exact linearised reference, the posterior masks, and the claim it
rests on (in the linear regime the full mode is the linearised predictive)."""

import pytest
import torch
from benchmark_scripts import benchmark_module
from torch import nn
from torch.func import functional_call, jacrev

DTYPE = torch.float64


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("streamlined_agreement_linear") as module:
        yield module


class _Residual(nn.Module):
    """Linear, LayerNorm, a residual MLP join and a head: enough graph for the full mode's cross-covariances."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.norm = nn.Linear(4, 6), nn.LayerNorm(6)
        self.branch, self.head = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)), nn.Linear(6, 3)

    def forward(self, x):
        h = self.norm(self.inp(x))
        return self.head(h + self.branch(h))


def _variances(model):
    gen = torch.Generator().manual_seed(1)
    return {n: torch.rand(p.shape, generator=gen, dtype=DTYPE) * 0.1 for n, p in model.named_parameters()}


def _dense_reference(model, variances, x):
    """Σ_c (J diag(v) Jᵀ)_cc per input, from the Jacobian of the flattened parameter vector."""
    names = list(variances)
    shapes = [variances[n].shape for n in names]
    flat = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])
    v = torch.cat([variances[n].reshape(-1) for n in names])

    def f(theta):
        parts = torch.split(theta, [s.numel() for s in shapes])
        return functional_call(model, {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}, (x,))

    jac = jacrev(f)(flat)  # (B, C, P)
    return (jac.square() * v).sum((-1, -2))


def test_exact_linearised_variance_is_the_dense_jacobian_sandwich(bench):
    model = _Residual().double().eval()
    variances = _variances(model)
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    torch.testing.assert_close(bench.exact_linearised_variance(model, variances, x, chunk=3),
                               _dense_reference(model, variances, x), rtol=1e-12, atol=0)
    kept = bench.masked(variances, ["branch."], ["2.bias"])
    assert {n for n, v in kept.items() if bool((v != 0).any())} == {"branch.0.weight", "branch.0.bias",
                                                                     "branch.2.weight"}
    torch.testing.assert_close(bench.exact_linearised_variance(model, kept, x),
                               _dense_reference(model, kept, x), rtol=1e-12, atol=0)


def test_full_mode_is_the_linearised_predictive_as_the_variance_vanishes(bench):
    """The premise of the benchmark: with the variances times s -> 0 every first-order-exact rule gives s times
    the linearised variance; the full mode (linearised LayerNorm) is such a rule, the diagonal mode is not."""
    from posthoc.streamlined import Streamlined
    model = _Residual().double().eval()
    variances = _variances(model)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    exact = bench.exact_linearised_variance(model, variances, x)
    s = 1e-6
    small = {n: v * s for n, v in variances.items()}
    full = Streamlined(model, weight_var=small, activation_covariance="full", layernorm="linearized")
    torch.testing.assert_close(full.predict(x).var.sum(-1) / s, exact, rtol=1e-4, atol=0)
    diagonal = Streamlined(model, weight_var=small).predict(x).var.sum(-1) / s
    assert float((diagonal / exact - 1).abs().max()) > 1e-2  # it drops the residual join's covariance
