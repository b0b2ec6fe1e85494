"""Fixtures of the fiber sampler's tests."""

from __future__ import annotations

import pytest
import torch
from fiber.common import trained_classifier


@pytest.fixture(scope="module")
def problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """trained_classifier(), once per test module."""
    return trained_classifier()
