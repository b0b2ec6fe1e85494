"""Fashion-MNIST, MNIST and KMNIST from the original idx ``.gz`` files.

Files are expected in torchvision's layout, ``<root>/<Name>/raw/<file>.gz``
with ``Name`` one of ``FashionMNIST``, ``MNIST``, ``KMNIST``. Every file is
md5-checked against its published sum before it is parsed. Nothing is
downloaded here; error messages give the URL to fetch a missing file from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from posthoc.data.idx import file_md5, read_idx
from posthoc.data.paths import resolve_data_dir

__all__ = [
    "VISION_DATASETS",
    "VISION_FILES",
    "VisionFile",
    "vision_file_path",
    "load_raw_arrays",
    "load_images",
    "to_float_images",
]

Split = Literal["train", "test"]

VISION_DATASETS: tuple[str, ...] = ("FashionMNIST", "MNIST", "KMNIST")

_ALIASES = {
    "fashionmnist": "FashionMNIST",
    "fashion-mnist": "FashionMNIST",
    "fmnist": "FashionMNIST",
    "mnist": "MNIST",
    "kmnist": "KMNIST",
}

_URL_BASE = {
    "FashionMNIST": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    # torchvision's mirror; the original is http://yann.lecun.com/exdb/mnist/
    "MNIST": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "KMNIST": "http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
}


@dataclass(frozen=True)
class VisionFile:
    """One original idx ``.gz`` file: its name, published md5 and download URL."""

    dataset: str
    filename: str
    md5: str
    url: str

    def path(self, root: Path) -> Path:
        """Expected location ``<root>/<dataset>/raw/<filename>``."""
        return root / self.dataset / "raw" / self.filename


def _file(dataset: str, filename: str, md5: str) -> VisionFile:
    return VisionFile(dataset, filename, md5, _URL_BASE[dataset] + filename)


# (dataset, split, "images" | "labels") -> file. md5s are the published ones
# (torchvision resources, Fashion-MNIST README, KMNIST md5sums).
VISION_FILES: dict[tuple[str, str, str], VisionFile] = {
    ("FashionMNIST", "train", "images"): _file("FashionMNIST", "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    ("FashionMNIST", "train", "labels"): _file("FashionMNIST", "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    ("FashionMNIST", "test", "images"): _file("FashionMNIST", "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    ("FashionMNIST", "test", "labels"): _file("FashionMNIST", "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
    ("MNIST", "train", "images"): _file("MNIST", "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    ("MNIST", "train", "labels"): _file("MNIST", "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    ("MNIST", "test", "images"): _file("MNIST", "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    ("MNIST", "test", "labels"): _file("MNIST", "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    # KMNIST train images are not staged (see the data MANIFEST), so only test is listed.
    ("KMNIST", "test", "images"): _file("KMNIST", "t10k-images-idx3-ubyte.gz", "5c965bf0a639b31b8f53240b1b52f4d7"),
    ("KMNIST", "test", "labels"): _file("KMNIST", "t10k-labels-idx1-ubyte.gz", "7320c461ea6c1c855c0b718fb2a4b134"),
}


def _canonical_name(name: str) -> str:
    if name in VISION_DATASETS:
        return name
    key = str(name).lower()
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(
        f"unknown image data set {name!r}; choose one of {', '.join(repr(n) for n in VISION_DATASETS)}"
    )


def _check_split(name: str, split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "KMNIST" and split == "train":
        raise ValueError(
            "KMNIST split='train' is not available: the KMNIST training images are not part of the "
            "staged data (only the test split is, which is all the benchmark needs as its OOD set); "
            "use split='test'"
        )


def vision_file_path(name: str, split: Split, kind: Literal["images", "labels"],
                     data_dir: str | os.PathLike | None = None) -> Path:
    """Path of one file, after checking that it exists and has the published md5.

    Raises ``FileNotFoundError`` (full expected path and download URL) for a
    missing file and ``ValueError`` (expected vs actual md5) for a changed one.
    Cost: one md5 pass over the file.
    """
    name = _canonical_name(name)
    _check_split(name, split)
    spec = VISION_FILES[(name, split, kind)]
    path = spec.path(resolve_data_dir(data_dir))
    if not path.is_file():
        raise FileNotFoundError(
            f"{name} {split} {kind} file not found: {path}\n"
            f"download it from {spec.url} and place it there (do not decompress it)"
        )
    actual = file_md5(path)
    if actual != spec.md5:
        raise ValueError(
            f"checksum mismatch for {path}: expected md5 {spec.md5}, got {actual}; the file is "
            f"corrupt or a different version: delete it and re-download it from {spec.url}"
        )
    return path


def load_raw_arrays(name: str, split: Split,
                    data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split as stored: uint8 ``(N, 28, 28)`` and uint8 ``(N,)``.

    ``name``: ``"FashionMNIST"``, ``"MNIST"`` or ``"KMNIST"`` (also ``"fmnist"``,
    ``"mnist"``, ``"kmnist"``). Root folder: ``data_dir``, else ``$POSTHOC_DATA``.
    Cost: md5 and decompression of both files (about 0.5 s for a 60k train split).
    """
    name = _canonical_name(name)
    _check_split(name, split)
    images = read_idx(vision_file_path(name, split, "images", data_dir), ndim=3)
    labels = read_idx(vision_file_path(name, split, "labels", data_dir), ndim=1)
    if images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{name} {split} images: expected uint8 (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{name} {split}: {images.shape[0]} images but {labels.shape[0]} labels ({labels.dtype}); "
            "the files do not belong together"
        )
    return images, labels


def to_float_images(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> float32 ``(N, 1, 28, 28)`` in [0, 1] (x / 255, no normalisation)."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0).unsqueeze(1)


def load_images(name: str, split: Split,
                data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as tensors: images float32 ``(N, 1, 28, 28)`` in [0, 1], labels int64 ``(N,)``.

    Train splits have N = 60,000, test splits N = 10,000. KMNIST has only its
    test split (``split="train"`` raises ``ValueError``). Cost: see
    :func:`load_raw_arrays`, plus 4 bytes per pixel of memory (188 MB for 60k).
    """
    images, labels = load_raw_arrays(name, split, data_dir)
    return to_float_images(images), torch.from_numpy(labels.astype(np.int64))
