"""An experimental activation rule for the agreement benchmark: Gaussian moment matching instead of linearisation.

posthoc's activation rules linearise at the mean (Var g(z) ≈ g'(μ)² σ²), which the agreement table measures as the
first node where Streamlined departs from Monte Carlo on several models (streamlined_agreement_nodes.py). This
module swaps in, for the duration of a ``with quadrature_activations():`` block, rules that keep the mean g(μ) (so
the propagated mean is still model(x)) and give the variance of g(z) for z ~ N(μ, σ²): closed form for ReLU,
Gauss-Hermite quadrature (32 nodes) for GELU, SiLU, tanh and sigmoid. Diagonal mode only (a ValueError in the full
mode). It lives in the benchmark, not in posthoc: it is the measured evidence for a rule change, not the change.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_NODES = 32
_X, _W = np.polynomial.hermite_e.hermegauss(N_NODES)  # probabilists' Hermite: weight exp(-x²/2)

_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
}
_MODULES: dict[type, str] = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh",
                             nn.Sigmoid: "sigmoid"}
_OPS: dict[Any, str] = {torch.relu: "relu", F.relu: "relu", "relu": "relu", F.gelu: "gelu", F.silu: "silu",
                        torch.tanh: "tanh", F.tanh: "tanh", "tanh": "tanh", torch.sigmoid: "sigmoid",
                        F.sigmoid: "sigmoid", "sigmoid": "sigmoid",
                        # the aten forms a torch.export graph holds
                        torch.ops.aten.relu.default: "relu", torch.ops.aten.relu_.default: "relu",
                        torch.ops.aten.gelu.default: "gelu", torch.ops.aten.silu.default: "silu",
                        torch.ops.aten.tanh.default: "tanh", torch.ops.aten.sigmoid.default: "sigmoid"}


def gaussian_variance(name: str, mu: torch.Tensor, var: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Var g(z) for z ~ N(mu, var) elementwise, same shape as mu; g named by ``name``.

    ReLU in closed form; the others by 32-node Gauss-Hermite quadrature (memory 32 × mu's). Cost O(32 · numel).
    """
    sd = var.clamp_min(0).sqrt()
    if name == "relu":
        safe = torch.where(sd > 0, sd, torch.ones_like(sd))
        a = mu / safe
        cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2)))
        pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
        first = mu * cdf + sd * pdf
        second = (mu * mu + var) * cdf + mu * sd * pdf
        return torch.where(sd > 0, (second - first * first).clamp_min(0), torch.zeros_like(mu))
    x = torch.as_tensor(_X, dtype=mu.dtype)
    w = torch.as_tensor(_W / _W.sum(), dtype=mu.dtype)
    z = mu.unsqueeze(-1) + sd.unsqueeze(-1) * x
    fn = _FUNCTIONS[name]
    g = fn(z, approximate=approximate) if name == "gelu" else fn(z)
    m = (g * w).sum(-1)
    return ((g - m.unsqueeze(-1)).square() * w).sum(-1)


def _moment_matched(name: str, state: Any, ctx: Any, approximate: str = "none") -> Any:
    from posthoc.streamlined.moments import Moments
    if ctx.full:
        raise ValueError("the quadrature activation rule is diagonal-mode only")
    fn = _FUNCTIONS[name]
    mean = fn(state.mean, approximate=approximate) if name == "gelu" else fn(state.mean)
    if state.var is None:
        return Moments(mean)
    return Moments(mean, var=gaussian_variance(name, state.mean, state.var, approximate))


def _module_rule(module: nn.Module, state: Any, ctx: Any, last: bool) -> Any:
    return _moment_matched(_MODULES[type(module)], state, ctx, getattr(module, "approximate", "none"))


def _op_rule(op: Any, args: tuple, kwargs: dict, ctx: Any) -> Any:
    name = _OPS[op if isinstance(op, str) else op]
    return _moment_matched(name, args[0], ctx, kwargs.get("approximate", "none"))


@contextmanager
def quadrature_activations() -> Iterator[None]:
    """Within the block, Streamlined's activation rules (modules and functional forms) are moment-matched.

    The registry's previous rules come back on exit (also on an error).
    """
    from posthoc.streamlined import RULES
    from posthoc.streamlined.rules.base import register_rule, rule_key
    saved = dict(RULES)
    try:
        register_rule(*_MODULES, replace=True)(_module_rule)
        register_rule(*_OPS, replace=True)(_op_rule)
        yield
    finally:
        changed = [rule_key(t) for t in (*_MODULES, *_OPS)]
        for key in changed:
            if key in saved:
                RULES[key] = saved[key]
            else:
                RULES.pop(key, None)


@contextmanager
def experimental_rules(option: dict) -> Iterator[None]:
    """The experimental rules an agreement option names: activations "quadrature".

    LayerNorm "expected" started here and is now posthoc's ``Streamlined(layernorm="expected")``, which the
    option passes on.
    """
    with contextlib.ExitStack() as stack:
        if option.get("activations") == "quadrature":
            stack.enter_context(quadrature_activations())
        yield
