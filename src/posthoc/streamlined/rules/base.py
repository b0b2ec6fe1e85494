"""The core every moment-propagation rule builds on: context, linearised step, advance and the rule registry.

The :class:`Context` of a walk, the linearised :class:`Step`, :func:`advance` (a step applied in diagonal or full
mode) and the one registry, :data:`RULES`, that :func:`register_rule` fills.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, TypeVar, cast

import torch

from posthoc.streamlined.moments import ActivationCovariance, Moments, add_optional, apply_to_crosses, sandwich
from posthoc.streamlined.weight_posteriors import WeightPosterior
from posthoc.utils.registry import add_to_registry


class AttentionRule(str, Enum):
    """How attention propagates: Q, K at their means and V random (the first two), or linearised in Q, K and V."""

    INDEPENDENT = "independent"  # the authors': Σ_o,t = Σ_s A_ts² Σ_v,s (tokens independent)
    SHARED_VALUE = "shared_value"  # diagonal mode: keeps the cross-token covariance of the shared random W_v
    LINEARIZED = "linearized"  # full mode: the attention weights linearised in Q and K too (exact to first order)


class LayerNormRule(str, Enum):
    """How LayerNorm is propagated: statistics frozen at the mean input, or its Jacobian there."""
    FROZEN = "frozen"  # the authors': statistics held at their values for the mean input
    LINEARIZED = "linearized"  # the Jacobian of LayerNorm at the mean input
    EXPECTED = "expected"  # frozen, but the scale the expected spread of the random input (its noise counted)


class ActivationRule(str, Enum):
    """How element-wise activations g propagate a variance (diagonal mode)."""
    LINEARIZED = "linearized"  # the authors': g'(μ)² σ², the activation linearised at the mean
    MOMENT_MATCHED = "moment_matched"  # Var g(z) for z ~ N(μ, σ²); the mean stays g(μ), i.e. model(x)


class PoolingRule(str, Enum):
    """How diagonal-mode average pooling and mean/sum reductions combine the variances of the entries they pool."""
    INDEPENDENT = "independent"  # the authors': entries uncorrelated, Var(Σ a_i x_i) = Σ a_i² σ_i²
    CORRELATED = "correlated"  # entries perfectly correlated, (Σ a_i σ_i)²: the upper bound (Cauchy-Schwarz)


class UnsupportedLayerError(TypeError):
    """A module has no moment-propagation rule."""


@dataclass
class Context:
    """What every rule of one propagation reads: the mode, the weight posterior and the rule options.

    ``max_full_dim`` bounds the layer width given a full (D x D) covariance (MemoryError above it).
    """
    mode: ActivationCovariance
    posterior: WeightPosterior
    attention: AttentionRule = AttentionRule.INDEPENDENT
    layernorm: LayerNormRule = LayerNormRule.FROZEN
    max_full_dim: int = 4096
    activations: ActivationRule = ActivationRule.LINEARIZED
    pooling: PoolingRule = PoolingRule.INDEPENDENT

    @property
    def full(self) -> bool:
        """Whether the walk carries full activation covariances."""
        return self.mode is ActivationCovariance.FULL


class Step:
    """A layer linearised at its input mean. ``mean``: (B, *out_shape)."""

    mean: torch.Tensor

    def jac(self, directions: torch.Tensor) -> torch.Tensor:
        """J applied to directions (B, N, *in_shape) -> (B, N, *out_shape)."""
        raise NotImplementedError

    def var(self, var_in: torch.Tensor | None) -> torch.Tensor | None:
        """Diagonal mode: output variances (B, *out_shape) (None: no variance)."""
        raise NotImplementedError

    def noise_full(self, cov_in: torch.Tensor | None) -> torch.Tensor | None:
        """Full mode: weight-noise covariance (B, D_out, D_out) given the input covariance, or None."""
        return None

    @property
    def has_noise(self) -> bool:
        """Whether the layer adds noise of its own (random weights): by default, whether it defines noise_full."""
        return type(self).noise_full is not Step.noise_full


def advance(state: Moments, step: Step, ctx: Context) -> Moments:
    """Apply a linearised layer to a state in the context's mode.

    Full mode: a deterministic input through a layer without noise stays deterministic, whatever its width (the
    layers before the first random weight carry no covariance); else MemoryError above ``ctx.max_full_dim``.
    """
    if not ctx.full:
        return Moments(step.mean, var=step.var(state.var))
    if state.cov is None and not state.crosses and not step.has_noise:
        return Moments(step.mean)
    d_out = int(step.mean[0].numel())
    if d_out > ctx.max_full_dim:
        raise MemoryError(f"full activation covariance needs {d_out} x {d_out} per example (a layer output of "
                          f"shape {tuple(step.mean.shape[1:])}), above max_full_dim={ctx.max_full_dim}; use "
                          "activation_covariance='diagonal' or raise max_full_dim")
    cov = None if state.cov is None else sandwich(step.jac, state.cov, state.shape)
    cov = add_optional(cov, step.noise_full(state.cov))
    return Moments(step.mean, cov=cov, crosses=apply_to_crosses(step.jac, state.crosses, state.shape))


# Module rules: rule(module, state, ctx, last) -> Moments, ``module`` an instance of a type it is registered for (so a
# rule may annotate ``module`` with that type: the parameter list is left open). Op rules (traced graphs, see
# :mod:`posthoc.streamlined.rules.ops`): rule(op, args, kwargs, ctx) -> Moments or a plain value.
Rule = Callable[..., Any]
RuleT = TypeVar("RuleT", bound=Rule)
RULES: dict[str, Rule] = {}


def rule_key(target: type | Callable[..., Any] | str) -> str:
    """The registry key of a module type, a function (``torch.add``, ``F.relu``, ``operator.add``) or a method name.

    Module types: ``"module <module>.<qualname>"``; functions: ``"function <module>.<name>"``; a string is a
    tensor method name (``"reshape"``): ``"method reshape"``.
    """
    if isinstance(target, str):
        return f"method {target}"
    if isinstance(target, type):
        return f"module {target.__module__}.{target.__qualname__}"
    module = getattr(target, "__module__", None) or "builtins"
    return f"function {module}.{getattr(target, '__name__', repr(target))}"


def register_rule(*targets: type | Callable[..., Any] | str, replace: bool = False) -> Callable[[RuleT], RuleT]:
    """Decorator: a moment-propagation rule for module types, functions or tensor-method names.

    Module rules are ``rule(module, state, ctx, last) -> Moments`` (exact type match); op rules, for the
    ``call_function`` / ``call_method`` nodes of a traced graph, are ``rule(op, args, kwargs, ctx)`` with the
    node's arguments, activations given as :class:`Moments`. Raises ValueError for a target already registered
    unless ``replace=True``.
    """

    def wrap(rule: RuleT) -> RuleT:
        for target in targets:
            add_to_registry(RULES, rule_key(target), cast(Rule, rule), "moment-propagation rule", replace=replace)
        return rule

    return wrap


def find_rule(target: type | Callable[..., Any] | str) -> Rule | None:
    """The rule registered for a module type, function or method name, or None."""
    return RULES.get(rule_key(target))
