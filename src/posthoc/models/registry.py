"""Name -> constructor lookup for the reference architectures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from posthoc.models.cnn import FMNISTCNN
from posthoc.models.lenet import LeNet
from posthoc.models.mlp import MLP
from posthoc.models.resnet import SmallResNet
from posthoc.models.vit import SmallViT
from posthoc.utils.registry import add_to_registry

__all__ = ["MODELS", "build_model", "count_parameters", "register_model"]


def _default_mlp(in_features: int = 784, **kwargs: Any) -> MLP:
    # The registry entry defaults to the 784-200-200-10 tanh image MLP.
    return MLP(in_features, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "fmnist_cnn": FMNISTCNN,
    "lenet": LeNet,
    "mlp": _default_mlp,
    "resnet_small": SmallResNet,
    "vit_small": SmallViT,
}


def register_model(name: str, factory: Callable[..., nn.Module], replace: bool = False) -> Callable[..., nn.Module]:
    """Make ``build_model(name, **kwargs)`` call ``factory(**kwargs)``; returns ``factory``.

    Raises:
        ValueError: ``name`` is empty or already registered (pass ``replace=True`` to replace it).
        TypeError: ``factory`` is not callable.
    """
    if not callable(factory):
        raise TypeError(f"a model factory must be callable, got {type(factory).__name__}")
    return add_to_registry(MODELS, name, factory, "model", replace)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Construct the registered model ``name`` with ``kwargs`` passed to its constructor.

    ``"mlp"`` defaults ``in_features`` to 784; :func:`register_model` adds names. Raises ``ValueError`` listing
    the valid names for an unknown ``name``.
    """
    try:
        factory = MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(map(repr, MODELS))} "
                         "(or register one with posthoc.models.register_model)") from None
    return factory(**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable (``requires_grad``) parameter entries of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
