"""A small residual network for 28×28 grey images."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from posthoc.utils.checks import check_positive_int

__all__ = ["ResidualBlock", "SmallResNet"]


class ResidualBlock(nn.Module):
    """Basic residual block: ``act2(branch(x) + shortcut(x))``.

    ``branch = conv1 -> bn1 -> act1 -> conv2 -> bn2`` with 3×3 convolutions (padding 1, no
    bias since BatchNorm follows; ``conv1`` carries the stride). ``shortcut`` is
    ``nn.Identity()`` when channels and stride are unchanged, otherwise
    ``nn.Sequential(conv=Conv2d(in, out, 1, stride, bias=False), bn=BatchNorm2d(out))``.

    Input ``(B, in_channels, H, W)``; output ``(B, out_channels, ⌈H/stride⌉, ⌈W/stride⌉)``.
    Parameters: ``9·in·out + 9·out·out + 4·out`` (two BN affine pairs), plus
    ``in·out + 2·out`` with a projection shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("stride", stride)):
            check_positive_int(v, name)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    [
                        ("conv", nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)),
                        ("bn", nn.BatchNorm2d(out_channels)),
                    ]
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.act2 = nn.ReLU()

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch ``bn2(conv2(act1(bn1(conv1(x)))))``."""
        return self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``act2(branch(x) + shortcut(x))``: ``(B, C_in, H, W) -> (B, C_out, H', W')``."""
        return self.act2(self.branch(x) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem, three residual blocks, global average pooling and a linear classifier.

    Children, in forward order (``list(model.children())`` walks them)::

        stem     Sequential(conv Conv2d(in, 16, 3, padding=1, bias=False), bn, act ReLU)  (B,16,28,28)
        blocks   Sequential(block1 16->16, block2 16->32 stride 2, block3 32->64 stride 2)  (B,64,7,7)
        pool     AdaptiveAvgPool2d(1)                                                       (B,64,1,1)
        flatten  Flatten                                                                    (B,64)
        fc       Linear(64, n_classes)                                                      (B,n_classes)

    Input ``(B, in_channels, 28, 28)``; output logits ``(B, n_classes)``. With the defaults
    it has 77,754 parameters: stem 176, blocks 4,672 + 14,528 + 57,728, ``fc`` 650.
    """

    def __init__(self, n_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        for name, v in (("n_classes", n_classes), ("in_channels", in_channels)):
            check_positive_int(v, name)
        self.n_classes = n_classes
        self.in_channels = in_channels
        self.stem = nn.Sequential(
            OrderedDict(
                [
                    ("conv", nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)),
                    ("bn", nn.BatchNorm2d(16)),
                    ("act", nn.ReLU()),
                ]
            )
        )
        self.blocks = nn.Sequential(
            OrderedDict(
                [
                    ("block1", ResidualBlock(16, 16)),
                    ("block2", ResidualBlock(16, 32, stride=2)),
                    ("block3", ResidualBlock(32, 64, stride=2)),
                ]
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, 64)`` for images ``(B, in_channels, H, W)``."""
        return self.flatten(self.pool(self.blocks(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)`` for images ``(B, in_channels, 28, 28)``."""
        return self.fc(self.features(x))
