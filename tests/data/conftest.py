"""Fixtures for the data tests: the full data folder (skips when absent) and shared loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# CI keeps the full data at ../shared/data relative to the repo root.
_REPO_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _find_data_root() -> Path | None:
    env = os.environ.get("POSTHOC_DATA", "")
    for candidate in ([Path(env)] if env else []) + [_REPO_DATA]:
        if (candidate / "FashionMNIST" / "raw").is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _find_data_root()
    if root is None:
        pytest.skip(f"full data folder not found (set POSTHOC_DATA or provide {_REPO_DATA})")
    return root


@pytest.fixture(scope="session")
def fmnist_train_raw(data_root):
    from posthoc.data import load_raw_arrays

    return load_raw_arrays("FashionMNIST", "train", data_root)


@pytest.fixture(scope="session")
def full_suite(data_root):
    from posthoc.data import fmnist_suite

    return fmnist_suite(data_root)
