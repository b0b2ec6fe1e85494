"""Name -> constructor lookup for the reference architectures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from posthoc.models.cnn import FMNISTCNN
from posthoc.models.mlp import MLP
from posthoc.models.resnet import SmallResNet
from posthoc.models.vit import SmallViT

__all__ = ["MODELS", "build_model", "count_parameters"]


def _default_mlp(in_features: int = 784, **kwargs: Any) -> MLP:
    # The registry entry defaults to the 784-200-200-10 tanh image MLP.
    return MLP(in_features, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "fmnist_cnn": FMNISTCNN,
    "mlp": _default_mlp,
    "resnet_small": SmallResNet,
    "vit_small": SmallViT,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Construct the registered model ``name`` with ``kwargs`` passed to its constructor.

    ``"mlp"`` defaults ``in_features`` to 784. Raises ``ValueError`` listing the valid names
    for an unknown ``name``.
    """
    try:
        factory = MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(map(repr, MODELS))}") from None
    return factory(**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable (``requires_grad``) parameter entries of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
