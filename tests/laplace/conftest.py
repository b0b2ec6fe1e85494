"""Fixtures of small float64 problems for the Laplace tests."""

from __future__ import annotations

import pytest
import torch

from posthoc.data.toy import blobs

DTYPE = torch.float64


@pytest.fixture
def classification_data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = blobs(n=24, n_classes=3, seed=3)
    x = torch.cat([x, x[:, :1] * x[:, 1:]], dim=1)  # 3 features
    return x.to(DTYPE), y


@pytest.fixture
def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=g, dtype=DTYPE)
    y = torch.sin(x[:, :1]) + 0.1 * torch.randn(20, 1, generator=g, dtype=DTYPE)
    return x, y


@pytest.fixture
def image_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(10, 1, 6, 6, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (10,), generator=g)
    return x, y


