import pytest
import torch
from torch.utils.data import TensorDataset

from posthoc.data import make_loader


def _order(loader):
    return torch.cat([b[1] for b in loader]).tolist()


def test_seeded_shuffle_is_deterministic():
    ds = TensorDataset(torch.randn(50, 3), torch.arange(50))
    a, b = make_loader(ds, 8, shuffle=True, seed=5), make_loader(ds, 8, shuffle=True, seed=5)
    assert a.num_workers == 0
    epochs_a = [_order(a) for _ in range(2)]
    epochs_b = [_order(b) for _ in range(2)]
    assert epochs_a == epochs_b
    assert epochs_a[0] != epochs_a[1]  # a new permutation each epoch
    assert sorted(epochs_a[0]) == list(range(50))
    assert _order(make_loader(ds, 8, shuffle=True, seed=6)) != epochs_a[0]


def test_no_shuffle_keeps_order():
    ds = TensorDataset(torch.randn(10, 3), torch.arange(10))
    loader = make_loader(ds, 4, shuffle=False)
    assert _order(loader) == list(range(10))
    assert [len(b[0]) for b in loader] == [4, 4, 2]
    assert [len(b[0]) for b in make_loader(ds, 4, shuffle=False, drop_last=True)] == [4, 4]


def test_shard_refuses_an_unsized_dataset_under_distributed(monkeypatch):
    from posthoc.data import loaders

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(4))

    monkeypatch.setattr(loaders, "world_size", lambda: 2)
    with pytest.raises(TypeError, match="without a length"):
        loaders.shard(Stream())
    assert len(loaders.shard(TensorDataset(torch.arange(4)))) == 2


def test_batch_size_must_be_a_positive_int():
    with pytest.raises(ValueError, match=r"batch_size must be a positive int \(examples per batch\), got 0"):
        make_loader(TensorDataset(torch.arange(4)), 0, shuffle=False)
