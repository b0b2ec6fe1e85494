"""The rule registry's public helpers: supported_layers, the unsupported-module error, register_graph (deprecated).

A model is propagated through its torch.fx graph (:mod:`posthoc.streamlined.traced`); every module with a rule in
the one registry (:data:`posthoc.streamlined.rules.RULES`, exact type match, filled by
:func:`posthoc.streamlined.rules.register_rule`) is a leaf of that graph. Streamlined knows no model: posthoc's own
networks are traced like a user's, and the two of their blocks that need a rule have it registered under their
class's name, without importing them (:mod:`posthoc.streamlined.rules.posthoc_blocks`).

Residual connections: diagonal mode adds means and variances (the authors' rule, the branch/skip covariance
dropped). Full mode keeps that covariance: the traced walk's join (:mod:`posthoc.streamlined.joint`).
"""

from __future__ import annotations

import warnings
from typing import Callable

from torch import nn

from posthoc.streamlined.rules import RULES, UnsupportedLayerError, register_rule
from posthoc.streamlined.rules.base import RuleT


def register_graph(*types: type, replace: bool = False) -> Callable[[RuleT], RuleT]:
    """Deprecated alias of :func:`posthoc.streamlined.register_rule`; warns DeprecationWarning.

    There is one rule registry; a rule takes ``(module, state, ctx, last) -> Moments`` whatever the module's forward.
    """
    warnings.warn("posthoc.streamlined.register_graph is deprecated: use posthoc.streamlined.register_rule (the "
                  "same registry and signature)", DeprecationWarning, stacklevel=2)
    return register_rule(*types, replace=replace)


def supported_layers() -> list[str]:
    """The names of the module types with a rule (sorted), for error messages and docs.

    Containers without a rule (nn.Sequential, a user's network) need none: their forward is traced.
    """
    return sorted({key.rpartition(".")[2] for key in RULES if key.startswith("module ")})


def unsupported_module(module: nn.Module) -> UnsupportedLayerError:
    """The error for a module without a rule: its type, the supported layers and register_rule."""
    return UnsupportedLayerError(f"no moment-propagation rule for {type(module).__name__}; supported layers: "
                                 f"{', '.join(supported_layers())}, and any container whose forward torch.fx traces "
                                 "(add one with posthoc.streamlined.register_rule)")
