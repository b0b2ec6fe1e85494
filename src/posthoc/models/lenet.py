"""LeNet-5 for 28×28 grey images (the Laplace Redux MNIST backbone; benchmarks/laplace_redux_mnist.py)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from posthoc.utils.checks import check_positive_int

__all__ = ["LeNet"]


class LeNet(nn.Sequential):
    """Two unpadded 5×5 conv blocks and a three-layer classifier, ReLU throughout.

    Layout (named children, in forward order)::

        conv1 Conv2d(in, 6, 5)   relu1  pool1 MaxPool2d(2)   28 -> 24 -> 12
        conv2 Conv2d(6, 16, 5)   relu2  pool2 MaxPool2d(2)   12 -> 8 -> 4
        flatten                                              16·4·4 = 256
        fc1 Linear(256, 120) relu3  fc2 Linear(120, 84) relu4  fc3 Linear(84, n_classes)

    Input ``(B, in_channels, 28, 28)`` floats in [0, 1] (no normalisation); output logits
    ``(B, n_classes)``. With the defaults (``in_channels=1``, ``n_classes=10``) it has
    44,426 parameters: 156 and 2,416 in the convolutions, 30,840, 10,164 and 850 in
    ``fc1``, ``fc2`` and ``fc3``. All layers carry biases. The last child is the final
    ``nn.Linear`` (what last-layer Laplace selects: 84·n_classes + n_classes weights).
    Cost of a forward pass: about 0.3 MFLOP per image.
    """

    def __init__(self, n_classes: int = 10, in_channels: int = 1) -> None:
        check_positive_int(n_classes, "n_classes")
        check_positive_int(in_channels, "in_channels")
        super().__init__(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, 6, kernel_size=5)),
                    ("relu1", nn.ReLU()),
                    ("pool1", nn.MaxPool2d(2)),
                    ("conv2", nn.Conv2d(6, 16, kernel_size=5)),
                    ("relu2", nn.ReLU()),
                    ("pool2", nn.MaxPool2d(2)),
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(16 * 4 * 4, 120)),
                    ("relu3", nn.ReLU()),
                    ("fc2", nn.Linear(120, 84)),
                    ("relu4", nn.ReLU()),
                    ("fc3", nn.Linear(84, n_classes)),
                ]
            )
        )
        self.n_classes = n_classes
        self.in_channels = in_channels

    def __getitem__(self, idx: int | slice) -> nn.Module:
        """A child by position, or a slice of the children as a plain ``nn.Sequential`` sharing their parameters.

        (``nn.Sequential`` would rebuild a slice through this class's constructor, which takes sizes.)
        ``net[:-1]`` maps images ``(B, C, 28, 28)`` to the penultimate features ``(B, 84)``.
        """
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    @property
    def feature_dim(self) -> int:
        """Width of the penultimate features, the input of ``fc3`` (84)."""
        return 84

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)`` for images ``(B, in_channels, 28, 28)``.

        Shapes are not checked here so that per-example transforms (``torch.func.vmap``, which
        drops the batch axis) pass through; a wrong image size fails in ``fc1``.
        """
        return super().forward(x)
