import dataclasses
import hashlib
import json
from importlib import resources

import numpy as np
import pytest
import torch

from posthoc.data import (
    SUITE_ROLES,
    ImageSuite,
    embedded_suite,
    get_suite,
    load_embedded_arrays,
    load_raw_arrays,
    stratified_split,
)

EMBEDDED_SIZES = {"train": 4000, "val": 1000, "test": 2000, "context": 1000, "ood": 2000}
SOURCES = {
    "train": ("FashionMNIST", "train"),
    "val": ("FashionMNIST", "train"),
    "test": ("FashionMNIST", "test"),
    "context": ("MNIST", "train"),
    "ood": ("KMNIST", "test"),
}


def _check_roles(suite: ImageSuite):
    for role, ds in suite.datasets().items():
        x, y = ds.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28), role
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],), role
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0, role
        assert int(y.min()) >= 0 and int(y.max()) < suite.n_classes, role


def test_full_suite_sizes(full_suite, fmnist_train_raw):
    assert full_suite.sizes == {"train": 55000, "val": 5000, "test": 10000, "context": 60000, "ood": 10000}
    assert full_suite.n_classes == 10 and full_suite.name == "fmnist"
    _check_roles(full_suite)
    assert torch.bincount(full_suite.val.tensors[1]).tolist() == [500] * 10
    # val is the seed-0 stratified split, and disjoint from train
    images, labels = fmnist_train_raw
    keep, hold = stratified_split(labels, 5000, 0)
    assert np.intersect1d(keep, hold).size == 0
    expected_val = torch.from_numpy(images[hold]).float().div(255).unsqueeze(1)
    assert torch.equal(full_suite.val.tensors[0], expected_val)
    assert torch.equal(full_suite.train.tensors[0][:100], torch.from_numpy(images[keep[:100]]).float().div(255).unsqueeze(1))


def test_fingerprint(full_suite):
    fp = full_suite.fingerprint
    assert isinstance(fp, str) and len(fp) == 16
    emb = embedded_suite()
    assert emb.fingerprint != fp
    assert embedded_suite().fingerprint == emb.fingerprint
    # changing the data (here: one label) changes the fingerprint
    y = emb.train.tensors[1].clone()
    y[0] = (y[0] + 1) % 10
    parts = emb.datasets()
    parts["train"] = torch.utils.data.TensorDataset(emb.train.tensors[0], y)
    assert ImageSuite(name="x", **parts).fingerprint != emb.fingerprint
    with pytest.raises(dataclasses.FrozenInstanceError):
        emb.name = "other"  # frozen


def test_embedded_suite():
    suite = embedded_suite()
    assert suite.sizes == EMBEDDED_SIZES and suite.name == "fmnist-embedded"
    _check_roles(suite)
    for role in ("train", "val", "test", "ood", "context"):
        counts = torch.bincount(getattr(suite, role).tensors[1], minlength=10)
        assert counts.tolist() == [EMBEDDED_SIZES[role] // 10] * 10, role
    assert get_suite("fmnist-embedded").fingerprint == suite.fingerprint


def test_embedded_manifest_matches_file():
    folder = resources.files("posthoc.data") / "embedded"
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    payload = (folder / "fmnist_small.npz").read_bytes()
    assert manifest["sha256"] == hashlib.sha256(payload).hexdigest()
    assert {r: v["count"] for r, v in manifest["roles"].items()} == EMBEDDED_SIZES
    assert "Zalando" in (folder / "LICENSES.md").read_text(encoding="utf-8")


def test_embedded_equals_full_data(data_root, fmnist_train_raw):
    arrays = load_embedded_arrays()
    keep, hold = stratified_split(fmnist_train_raw[1], 5000, 0)
    assert np.isin(arrays["train_index"], keep).all()
    assert np.isin(arrays["val_index"], hold).all()
    cache = {("FashionMNIST", "train"): fmnist_train_raw}
    for role in SUITE_ROLES:
        src = SOURCES[role]
        if src not in cache:
            cache[src] = load_raw_arrays(*src, data_dir=data_root)
        images, labels = cache[src]
        idx = arrays[f"{role}_index"]
        assert np.array_equal(arrays[f"{role}_images"], images[idx]), role
        assert np.array_equal(arrays[f"{role}_labels"], labels[idx]), role


def test_get_suite_unknown():
    with pytest.raises(ValueError, match="fmnist-embedded"):
        get_suite("cifar10")
