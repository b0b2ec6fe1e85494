"""Data sets: image benchmarks (FMNIST / MNIST / KMNIST), UCI regression, toy sets, loaders.

Full data sets are read from a folder given as ``data_dir`` or by the
environment variable ``POSTHOC_DATA``; a small FMNIST benchmark subset ships
inside the package (:func:`embedded_suite`).
"""

from posthoc.data.idx import file_md5, parse_idx, read_idx
from posthoc.data.loaders import make_loader
from posthoc.data.paths import DATA_ENV_VAR, resolve_data_dir
from posthoc.data.splits import stratified_split
from posthoc.data.suites import (
    SUITE_NAMES,
    SUITE_ROLES,
    ImageSuite,
    embedded_suite,
    fmnist_suite,
    get_suite,
    load_embedded_arrays,
    suite_fingerprint,
)
from posthoc.data.toy import GAP_INTERVAL, blobs, gap_function, gap_regression, two_moons
from posthoc.data.uci import UCI_DATASETS, UCISplit, load_uci, n_splits
from posthoc.data.vision import (
    VISION_DATASETS,
    VISION_FILES,
    VisionFile,
    load_images,
    load_raw_arrays,
    vision_file_path,
)

__all__ = [
    "DATA_ENV_VAR",
    "GAP_INTERVAL",
    "SUITE_NAMES",
    "SUITE_ROLES",
    "UCI_DATASETS",
    "VISION_DATASETS",
    "VISION_FILES",
    "ImageSuite",
    "UCISplit",
    "VisionFile",
    "blobs",
    "embedded_suite",
    "file_md5",
    "fmnist_suite",
    "gap_function",
    "gap_regression",
    "get_suite",
    "load_embedded_arrays",
    "load_images",
    "load_raw_arrays",
    "load_uci",
    "make_loader",
    "n_splits",
    "parse_idx",
    "read_idx",
    "resolve_data_dir",
    "stratified_split",
    "suite_fingerprint",
    "two_moons",
    "vision_file_path",
]
