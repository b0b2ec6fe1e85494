import shutil

import pytest
import torch

from posthoc.data import VISION_FILES, file_md5, load_images, resolve_data_dir, vision_file_path


def test_all_staged_files_match_published_md5(data_root):
    for spec in VISION_FILES.values():
        assert file_md5(spec.path(data_root)) == spec.md5, spec.filename


@pytest.mark.parametrize(
    "name,split,n",
    [("FashionMNIST", "test", 10000), ("MNIST", "train", 60000), ("MNIST", "test", 10000), ("KMNIST", "test", 10000)],
)
def test_shapes_ranges(data_root, name, split, n):
    x, y = load_images(name, split, data_root)
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.bincount(y, minlength=10).min() > 0


def test_fmnist_train(fmnist_train_raw):
    images, labels = fmnist_train_raw
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
    assert labels.max() == 9 and (labels == 0).sum() == 6000


def test_aliases(data_root):
    x1, _ = load_images("kmnist", "test", data_root)
    x2, _ = load_images("KMNIST", "test", data_root)
    assert torch.equal(x1, x2)


def test_kmnist_train_is_refused(data_root):
    with pytest.raises(ValueError, match="KMNIST.*train.*not available"):
        load_images("KMNIST", "train", data_root)


def test_unknown_name_and_split(data_root):
    with pytest.raises(ValueError, match="FashionMNIST"):
        load_images("CIFAR10", "test", data_root)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_images("MNIST", "val", data_root)


def test_missing_file_names_path_and_url(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_images("FashionMNIST", "test", tmp_path)
    expected = tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    assert str(expected) in str(err.value)
    assert "http" in str(err.value)


def test_corrupt_file_md5_error(tmp_path, data_root):
    spec = VISION_FILES[("FashionMNIST", "test", "labels")]
    dst = spec.path(tmp_path)
    dst.parent.mkdir(parents=True)
    shutil.copyfile(spec.path(data_root), dst)
    assert vision_file_path("FashionMNIST", "test", "labels", tmp_path) == dst
    data = bytearray(dst.read_bytes())
    data[100] ^= 0xFF
    dst.write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        vision_file_path("FashionMNIST", "test", "labels", tmp_path)
    msg = str(err.value)
    assert str(dst) in msg and spec.md5 in msg and file_md5(dst) in msg and "re-download" in msg


def test_env_var(monkeypatch, data_root, tmp_path):
    monkeypatch.setenv("POSTHOC_DATA", str(data_root))
    assert resolve_data_dir() == data_root
    x, _ = load_images("KMNIST", "test")
    assert x.shape[0] == 10000
    # an explicit data_dir wins over the environment
    with pytest.raises(FileNotFoundError):
        load_images("KMNIST", "test", data_dir=tmp_path)
    monkeypatch.delenv("POSTHOC_DATA")
    with pytest.raises(ValueError, match="--data-dir.*POSTHOC_DATA"):
        load_images("KMNIST", "test")
