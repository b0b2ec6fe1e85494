"""Streamlined prediction (Li, Klasson, Solin, Trapp, ICLR 2025): sampling-free moment propagation.

The Gaussian weight posterior is propagated through the network, no sampling and no Jacobians
(docs/streamlined.md).
"""

from posthoc.streamlined.moments import ActivationCovariance, Moments
from posthoc.streamlined.rules import (
    RULES,
    ActivationRule,
    AttentionRule,
    LayerNormRule,
    PoolingRule,
    UnsupportedLayerError,
    UnsupportedOpError,
    register_rule,
)
from posthoc.streamlined.streamlined import Streamlined
from posthoc.streamlined.walk import register_graph, supported_layers

__all__ = [
    "ActivationCovariance",
    "ActivationRule",
    "AttentionRule",
    "LayerNormRule",
    "Moments",
    "PoolingRule",
    "RULES",
    "Streamlined",
    "UnsupportedLayerError",
    "UnsupportedOpError",
    "register_graph",
    "register_rule",
    "supported_layers",
]
