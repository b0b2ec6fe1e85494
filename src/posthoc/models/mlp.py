"""Fully connected networks for images (flattened), UCI regression and toy problems."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from enum import Enum

from torch import nn

from posthoc.utils.checks import check_choice, check_positive_int

__all__ = ["Activation", "MLP", "make_activation"]


class Activation(str, Enum):
    """Element-wise activations an :class:`MLP` can use (all supported by moment propagation)."""

    TANH = "tanh"
    RELU = "relu"
    GELU = "gelu"
    SIGMOID = "sigmoid"
    SILU = "silu"


_ACTIVATION_MODULES: dict[Activation, type[nn.Module]] = {
    Activation.TANH: nn.Tanh,
    Activation.RELU: nn.ReLU,
    Activation.GELU: nn.GELU,
    Activation.SIGMOID: nn.Sigmoid,
    Activation.SILU: nn.SiLU,
}


def make_activation(activation: str | Activation) -> nn.Module:
    """A fresh activation module; ``ValueError`` listing the options for an unknown name."""
    return _ACTIVATION_MODULES[check_choice(activation, Activation, "activation")]()


class MLP(nn.Sequential):
    """``[Flatten] -> (Linear -> activation) × len(hidden) -> Linear``.

    Named children in forward order: ``flatten`` (only when ``flatten=True``), then
    ``fc1, act1, fc2, act2, …`` and the final ``fc{len(hidden)+1}``, which is always the
    last child (what last-layer Laplace selects).

    Shapes: with ``flatten=True`` the input is ``(B, *)`` whose trailing dimensions
    multiply to ``in_features`` (e.g. images ``(B, 1, 28, 28)`` with ``in_features=784``);
    with ``flatten=False`` it is ``(B, in_features)``. Output ``(B, out_features)``.

    Parameter count: ``Σ_l (n_{l-1} + 1) n_l`` over the widths
    ``(in_features, *hidden, out_features)``; the default 784-200-200-10 has 199,210.
    Examples: ``MLP(784)`` for (F)MNIST, ``MLP(d, (50,), 1, "relu", flatten=False)`` for UCI.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (200, 200),
        out_features: int = 10,
        activation: str | Activation = "tanh",
        flatten: bool = True,
    ) -> None:
        act = check_choice(activation, Activation, "activation")
        widths = [in_features, *hidden, out_features]
        for i, w in enumerate(widths):
            check_positive_int(
                w, "layer widths", f"position {i} of (in_features, *hidden, out_features) = {tuple(widths)}"
            )
        layers: list[tuple[str, nn.Module]] = []
        if flatten:
            layers.append(("flatten", nn.Flatten()))
        n_linear = len(widths) - 1
        for i in range(n_linear):
            layers.append((f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1])))
            if i < n_linear - 1:
                layers.append((f"act{i + 1}", make_activation(act)))
        super().__init__(OrderedDict(layers))
        self.in_features = in_features
        self.hidden = tuple(hidden)
        self.out_features = out_features
        self.activation = act
