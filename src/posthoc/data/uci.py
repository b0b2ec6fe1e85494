"""The UCI regression benchmark (Hernandez-Lobato & Adams 2015; Gal & Ghahramani 2016).

Layout: ``<root>/UCI/<name>/data/`` with ``data.txt`` (whitespace-separated
numbers), ``index_features.txt`` and ``index_target.txt`` (0-based columns)
and the fixed splits ``index_train_{i}.txt`` / ``index_test_{i}.txt`` (row
numbers; 20 splits, 5 for protein-tertiary-structure).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from posthoc.data.paths import resolve_data_dir

__all__ = ["UCI_DATASETS", "UCISplit", "load_uci", "n_splits", "uci_dir"]

UCI_DATASETS: tuple[str, ...] = (
    "bostonHousing",
    "concrete",
    "energy",
    "kin8nm",
    "naval-propulsion-plant",
    "power-plant",
    "protein-tertiary-structure",
    "wine-quality-red",
    "yacht",
)


@dataclass(frozen=True, eq=False)
class UCISplit:
    """One train/test split, standardised with the training part's statistics.

    ``x_train`` ``(N_train, D)``, ``y_train`` ``(N_train, 1)``, ``x_test``
    ``(N_test, D)``, ``y_test`` ``(N_test, 1)``: float32, equal to
    ``(raw - mean) / std``. ``x_mean``, ``x_std`` ``(D,)`` and ``y_mean``,
    ``y_std`` ``(1,)``: float32 training-split mean and population standard
    deviation (ddof 0); a constant column gets std 1. In original units,
    ``y = y_std * y_standardised + y_mean``: a predictive mean maps the same
    way, a predictive standard deviation is multiplied by ``y_std`` and a
    Gaussian log-likelihood shifts by ``-log(y_std)``.
    """

    name: str
    split: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor

    @property
    def n_features(self) -> int:
        """Number of input columns ``D``."""
        return int(self.x_train.shape[1])

    def y_to_original(self, y: torch.Tensor) -> torch.Tensor:
        """Map standardised targets (or predictive means) ``(..., 1)`` back to original units."""
        return y * self.y_std.to(y) + self.y_mean.to(y)


def _check_name(name: str) -> None:
    if name not in UCI_DATASETS:
        raise ValueError(f"unknown UCI data set {name!r}; choose one of {', '.join(UCI_DATASETS)}")


def uci_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Folder ``<root>/UCI/<name>/data`` of one data set (existence not checked)."""
    _check_name(name)
    return resolve_data_dir(data_dir) / "UCI" / name / "data"


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"UCI file not found: {path}")
    return path


def n_splits(name: str, data_dir: str | os.PathLike | None = None) -> int:
    """Number of standard splits of ``name`` (20; 5 for protein-tertiary-structure).

    Counts ``index_train_0.txt, index_train_1.txt, ...`` until the first gap.
    Raises ``FileNotFoundError`` naming ``index_train_0.txt`` if there is none.
    """
    folder = uci_dir(name, data_dir)
    _need(folder / "index_train_0.txt")
    count = 0
    while (folder / f"index_train_{count}.txt").is_file():
        count += 1
    return count


def _read_indices(path: Path) -> np.ndarray:
    return np.loadtxt(_need(path), dtype=np.int64, ndmin=1)


def _standardise(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    # exact test for constant columns: a computed std of ~1e-17 would blow values up
    constant = train.max(axis=0) == train.min(axis=0)
    std = np.where(constant, 1.0, std)
    return mean, std


def load_uci(name: str, split: int = 0, data_dir: str | os.PathLike | None = None) -> UCISplit:
    """Load split ``split`` of UCI data set ``name``, standardised on its training part.

    ``name``: one of ``UCI_DATASETS``. Root folder: ``data_dir``, else
    ``$POSTHOC_DATA``. Cost: parsing ``data.txt`` (from 11 kB for yacht to
    3.5 MB, about a second, for protein).

    Raises ``ValueError`` for an unknown name or a split out of range and
    ``FileNotFoundError`` (full path) for a missing file.
    """
    _check_name(name)
    if isinstance(split, bool) or not isinstance(split, (int, np.integer)):
        raise TypeError(f"split must be an int, got {type(split).__name__}")
    total = n_splits(name, data_dir)
    if not 0 <= split < total:
        raise ValueError(f"split {split} out of range for {name}: it has {total} splits, 0..{total - 1}")
    folder = uci_dir(name, data_dir)
    data = np.loadtxt(_need(folder / "data.txt"), dtype=np.float64, ndmin=2)
    features = _read_indices(folder / "index_features.txt")
    target = _read_indices(folder / "index_target.txt")
    train_idx = _read_indices(folder / f"index_train_{split}.txt")
    test_idx = _read_indices(folder / f"index_test_{split}.txt")
    if target.size != 1:
        raise ValueError(f"{folder / 'index_target.txt'} must name one column, got {target.tolist()}")
    for idx, what in ((features, "feature columns"), (target, "target column")):
        if idx.min() < 0 or idx.max() >= data.shape[1]:
            raise ValueError(f"{name}: {what} {idx.tolist()} out of range for {data.shape[1]} columns")
    for idx, what in ((train_idx, "train"), (test_idx, "test")):
        if idx.size == 0 or idx.min() < 0 or idx.max() >= data.shape[0]:
            raise ValueError(f"{name} split {split}: {what} row indices out of range for {data.shape[0]} rows")

    x, y = data[:, features], data[:, target]
    x_mean, x_std = _standardise(x[train_idx])
    y_mean, y_std = _standardise(y[train_idx])

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    return UCISplit(
        name=name,
        split=int(split),
        x_train=t((x[train_idx] - x_mean) / x_std),
        y_train=t((y[train_idx] - y_mean) / y_std),
        x_test=t((x[test_idx] - x_mean) / x_std),
        y_test=t((y[test_idx] - y_mean) / y_std),
        x_mean=t(x_mean),
        x_std=t(x_std),
        y_mean=t(y_mean),
        y_std=t(y_std),
    )
