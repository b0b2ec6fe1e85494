"""A ``record`` fixture that prints measured figures (run pytest with -s to see them)."""

from __future__ import annotations

import pytest


@pytest.fixture
def record():
    def emit(label: str, **values: float) -> None:
        print(f"\n[streamlined] {label}: " + ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
    return emit
