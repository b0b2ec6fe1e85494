import numpy as np
import pytest
import torch

from posthoc.data import UCI_DATASETS, load_uci, n_splits


@pytest.mark.parametrize("name,n_train,n_test,d", [("yacht", 277, 31, 6), ("concrete", 927, 103, 8)])
def test_shapes_and_standardisation(data_root, name, n_train, n_test, d):
    s = load_uci(name, 0, data_root)
    assert s.x_train.shape == (n_train, d) and s.y_train.shape == (n_train, 1)
    assert s.x_test.shape == (n_test, d) and s.y_test.shape == (n_test, 1)
    assert s.n_features == d
    for t in (s.x_train, s.y_train, s.x_test, s.y_test, s.x_mean, s.x_std, s.y_mean, s.y_std):
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all())
    assert torch.allclose(s.x_train.mean(0), torch.zeros(d), atol=1e-5)
    assert torch.allclose(s.x_train.std(0, unbiased=False), torch.ones(d), atol=1e-4)
    assert abs(float(s.y_train.mean())) < 1e-5
    assert abs(float(s.y_train.std(unbiased=False)) - 1) < 1e-4


def test_original_units(data_root):
    s = load_uci("yacht", 3, data_root)
    folder = data_root / "UCI" / "yacht" / "data"
    data = np.loadtxt(folder / "data.txt")
    test_idx = np.loadtxt(folder / "index_test_3.txt", dtype=int)
    y_raw = torch.from_numpy(data[test_idx, 6:7]).float()
    assert torch.allclose(s.y_to_original(s.y_test), y_raw, atol=1e-3)


def test_constant_column_gets_unit_std(data_root):
    s = load_uci("naval-propulsion-plant", 0, data_root)
    assert bool(torch.isfinite(s.x_train).all())
    constant = s.x_train.abs().amax(0) == 0
    assert bool(constant.any())
    assert torch.equal(s.x_std[constant], torch.ones(int(constant.sum())))


def test_n_splits(data_root):
    assert n_splits("yacht", data_root) == 20
    assert n_splits("protein-tertiary-structure", data_root) == 5
    assert set(UCI_DATASETS) == {p.name for p in (data_root / "UCI").iterdir() if p.is_dir()}


def test_errors(data_root, tmp_path):
    with pytest.raises(ValueError, match="yacht"):
        load_uci("boston", 0, data_root)
    with pytest.raises(ValueError, match="out of range"):
        load_uci("yacht", 20, data_root)
    with pytest.raises(ValueError, match="out of range"):
        load_uci("protein-tertiary-structure", 5, data_root)
    with pytest.raises(FileNotFoundError) as err:
        load_uci("yacht", 0, tmp_path)
    assert str(tmp_path / "UCI" / "yacht" / "data" / "index_train_0.txt") in str(err.value)
