"""Image benchmark suites: train / validation / test / context / OOD sets.

The FMNIST benchmark (see docs/benchmarks.md and docs/data.md): in-distribution Fashion-MNIST,
a fixed stratified validation split of its training set, context set MNIST
train, OOD set KMNIST test. ``embedded_suite`` is a small subset of the same
data shipped inside the package, so examples and tests run without downloads.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import torch
from torch.utils.data import TensorDataset

from posthoc.data.splits import stratified_split
from posthoc.data.vision import load_images, load_raw_arrays, to_float_images

__all__ = [
    "ImageSuite",
    "SUITE_ROLES",
    "SUITE_NAMES",
    "EMBEDDED_NPZ",
    "fmnist_suite",
    "embedded_suite",
    "get_suite",
    "suite_fingerprint",
    "load_embedded_arrays",
]

SUITE_ROLES: tuple[str, ...] = ("train", "val", "test", "context", "ood")
SUITE_NAMES: tuple[str, ...] = ("fmnist", "fmnist-embedded")
EMBEDDED_NPZ = "fmnist_small.npz"

# Rows of each role's images that enter the fingerprint: about this many, evenly strided.
_FINGERPRINT_ROWS = 512


def suite_fingerprint(datasets: dict[str, TensorDataset]) -> str:
    """Short (16 hex digits) sha1 identifying the data in ``datasets``.

    Hashed, per role in the given order: the role name, the image and label
    shapes and dtypes, all labels (as little-endian int64) and an evenly
    strided sample of about 512 images per role (their float32 bytes,
    little-endian). Two suites with the same sizes, the same labels in the
    same order and the same sampled images get the same fingerprint. Cost:
    hashing about 2 MB per role, a few milliseconds.
    """
    h = hashlib.sha1(b"posthoc.ImageSuite/v1")
    for role, ds in datasets.items():
        x, y = ds.tensors[0], ds.tensors[1]
        h.update(f"|{role}|{tuple(x.shape)}|{x.dtype}|{tuple(y.shape)}|{y.dtype}|".encode())
        h.update(y.detach().cpu().numpy().astype("<i8").tobytes())
        if x.shape[0]:
            step = max(1, x.shape[0] // _FINGERPRINT_ROWS)
            sample = x.detach().cpu().reshape(x.shape[0], -1)[::step]
            h.update(sample.numpy().astype("<f4").tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class ImageSuite:
    """The data of one image benchmark.

    Each of ``train``, ``val``, ``test``, ``context``, ``ood`` is a
    ``TensorDataset`` of (images float32 ``(N, 1, 28, 28)`` in [0, 1], labels
    int64 ``(N,)``). ``val`` is disjoint from ``train`` and serves all tuning;
    ``context`` holds inputs from a related distribution (their labels are of
    their own data set); ``ood`` is the out-of-distribution test set.
    ``fingerprint`` (computed, see :func:`suite_fingerprint`) keys model
    checkpoints to the exact data.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    context: TensorDataset
    ood: TensorDataset
    n_classes: int = 10
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        for role in SUITE_ROLES:
            ds = getattr(self, role)
            if not isinstance(ds, TensorDataset) or len(ds.tensors) != 2:
                raise TypeError(f"ImageSuite.{role} must be a TensorDataset of (images, labels)")
            x, y = ds.tensors
            if x.ndim != 4 or x.dtype != torch.float32 or y.ndim != 1 or y.dtype != torch.int64:
                raise ValueError(
                    f"ImageSuite.{role}: expected images float32 (N, C, H, W) and labels int64 (N,), "
                    f"got {x.dtype} {tuple(x.shape)} and {y.dtype} {tuple(y.shape)}"
                )
        object.__setattr__(self, "fingerprint", suite_fingerprint(self.datasets()))

    def datasets(self) -> dict[str, TensorDataset]:
        """The five data sets by role, in the order of ``SUITE_ROLES``."""
        return {role: getattr(self, role) for role in SUITE_ROLES}

    @property
    def sizes(self) -> dict[str, int]:
        """Number of images per role."""
        return {role: len(ds) for role, ds in self.datasets().items()}


def _tds(images: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
    return TensorDataset(images, labels)


def fmnist_suite(data_dir: str | os.PathLike | None = None, val_size: int = 5000,
                 seed: int = 0) -> ImageSuite:
    """The full FMNIST benchmark from the idx files (see docs/benchmarks.md).

    train: Fashion-MNIST train minus a stratified ``val_size`` validation
    split (55,000 by default); val: that split (5,000, 500 per class, chosen by
    :func:`stratified_split` with ``seed``); test: Fashion-MNIST test (10,000);
    context: MNIST train (60,000); ood: KMNIST test (10,000). Root folder:
    ``data_dir``, else ``$POSTHOC_DATA``. Cost: md5 + decompression of about
    45 MB of gzip files (a few seconds) and about 600 MB of float32 tensors.
    """
    images, labels = load_raw_arrays("FashionMNIST", "train", data_dir)
    keep, hold = stratified_split(labels, val_size, seed)
    y = labels.astype(np.int64)
    # index the uint8 arrays before converting, so no full float copy is made
    return ImageSuite(
        name="fmnist",
        train=_tds(to_float_images(images[keep]), torch.from_numpy(y[keep])),
        val=_tds(to_float_images(images[hold]), torch.from_numpy(y[hold])),
        test=_tds(*load_images("FashionMNIST", "test", data_dir)),
        context=_tds(*load_images("MNIST", "train", data_dir)),
        ood=_tds(*load_images("KMNIST", "test", data_dir)),
    )


def load_embedded_arrays() -> dict[str, np.ndarray]:
    """The raw arrays of the embedded subset, read with ``importlib.resources``.

    Keys ``<role>_images`` (uint8 ``(N, 28, 28)``), ``<role>_labels`` (uint8
    ``(N,)``) and ``<role>_index`` (int64 ``(N,)``: row of each image in its
    source split) for every role in ``SUITE_ROLES``. See ``embedded/manifest.json``.
    """
    res = resources.files("posthoc.data") / "embedded" / EMBEDDED_NPZ
    if not res.is_file():
        raise FileNotFoundError(
            f"embedded data file {EMBEDDED_NPZ} is missing from the posthoc.data package; "
            "regenerate it with scripts/make_embedded_data.py"
        )
    with np.load(io.BytesIO(res.read_bytes()), allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    for role in SUITE_ROLES:
        for suffix in ("images", "labels", "index"):
            if f"{role}_{suffix}" not in arrays:
                raise ValueError(f"embedded {EMBEDDED_NPZ} lacks the array {role}_{suffix}; regenerate it")
    return arrays


def embedded_suite() -> ImageSuite:
    """The small FMNIST benchmark shipped inside the package (no files needed).

    Sizes: train 4,000 (400 per class, from the Fashion-MNIST training images
    outside the 5,000-image validation split of ``fmnist_suite()``), val 1,000
    (100 per class, from that validation split), test 2,000 (200 per class),
    context 1,000 MNIST train images, ood 2,000 KMNIST test images. Same
    dtypes, shapes and value range as :func:`fmnist_suite`. Cost: reading a
    ~4 MB compressed file, well under a second.
    """
    arrays = load_embedded_arrays()

    def part(role: str) -> TensorDataset:
        return _tds(to_float_images(arrays[f"{role}_images"]),
                    torch.from_numpy(arrays[f"{role}_labels"].astype(np.int64)))

    return ImageSuite(name="fmnist-embedded", train=part("train"), val=part("val"), test=part("test"),
                      context=part("context"), ood=part("ood"))


def get_suite(name: str, data_dir: str | os.PathLike | None = None) -> ImageSuite:
    """Suite by name: ``"fmnist"`` (full files) or ``"fmnist-embedded"`` (shipped subset).

    ``"fmnist"`` reads the idx files under ``data_dir`` (see :func:`fmnist_suite`); ``"fmnist-embedded"``
    ignores ``data_dir``.

    Raises:
        ValueError: For an unknown name, listing the valid ones.
    """
    if name == "fmnist":
        return fmnist_suite(data_dir)
    if name == "fmnist-embedded":
        return embedded_suite()
    raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(repr(n) for n in SUITE_NAMES)}")
