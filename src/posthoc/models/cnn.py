"""The FMNIST reference CNN (the ScaLLA authors' backbone; see docs/benchmarks.md)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from posthoc.utils.checks import check_positive_int

__all__ = ["FMNISTCNN"]

# Children up to and including this one form the convolutional trunk.
_TRUNK_END = "flatten"


class FMNISTCNN(nn.Sequential):
    """Three conv blocks and a two-layer classifier head for 28×28 grey images.

    Layout (named children, in forward order)::

        conv1 Conv2d(in, 16, 3, padding=1, bias=False)  relu1  pool1 MaxPool2d(2)   28 -> 14
        conv2 Conv2d(16, 32, 3, padding=1, bias=False)  relu2  pool2 MaxPool2d(2)   14 -> 7
        conv3 Conv2d(32, 64, 3, padding=1, bias=False)  relu3  pool3 MaxPool2d(2)    7 -> 3
        flatten                                                                      64·3·3 = 576
        fc1 Linear(576, 200)  relu4  fc2 Linear(200, n_classes)

    Input ``(B, in_channels, 28, 28)`` floats in [0, 1] (no normalisation); output logits
    ``(B, n_classes)``. With the defaults (``in_channels=1``, ``n_classes=10``) it has
    exactly 140,594 parameters: 144 + 4,608 + 18,432 conv weights, 115,400 in ``fc1`` and
    2,010 in ``fc2``.

    The last child is the final ``nn.Linear`` (what last-layer Laplace selects).
    """

    def __init__(self, n_classes: int = 10, in_channels: int = 1) -> None:
        check_positive_int(n_classes, "n_classes")
        check_positive_int(in_channels, "in_channels")
        super().__init__(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)),
                    ("relu1", nn.ReLU()),
                    ("pool1", nn.MaxPool2d(2)),
                    ("conv2", nn.Conv2d(16, 32, kernel_size=3, padding=1, bias=False)),
                    ("relu2", nn.ReLU()),
                    ("pool2", nn.MaxPool2d(2)),
                    ("conv3", nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False)),
                    ("relu3", nn.ReLU()),
                    ("pool3", nn.MaxPool2d(2)),
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(64 * 3 * 3, 200)),
                    ("relu4", nn.ReLU()),
                    ("fc2", nn.Linear(200, n_classes)),
                ]
            )
        )
        self.n_classes = n_classes
        self.in_channels = in_channels

    def _part(self, trunk: bool) -> nn.Sequential:
        # Built explicitly: slicing would call FMNISTCNN(OrderedDict), not nn.Sequential.
        names = list(self._modules)
        split = names.index(_TRUNK_END) + 1
        chosen = names[:split] if trunk else names[split:]
        return nn.Sequential(OrderedDict((n, self._modules[n]) for n in chosen))

    @property
    def trunk(self) -> nn.Sequential:
        """The conv part up to and including ``flatten``: ``(B, C_in, 28, 28) -> (B, 576)``.

        A new ``nn.Sequential`` that shares its modules (and so its parameters) with this
        network; ``copy.deepcopy`` it for an independent copy (e.g. a surrogate's backbone).
        """
        return self._part(trunk=True)

    @property
    def head(self) -> nn.Sequential:
        """The classifier ``fc1 -> relu4 -> fc2``: ``(B, 576) -> (B, n_classes)``, shared modules."""
        return self._part(trunk=False)

    @property
    def feature_dim(self) -> int:
        """Width of the trunk output (576)."""
        return 64 * 3 * 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)`` for images ``(B, in_channels, 28, 28)``."""
        return super().forward(x)
