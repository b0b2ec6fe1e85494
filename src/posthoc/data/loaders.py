"""Deterministic DataLoaders."""

from __future__ import annotations

from collections.abc import Sized

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from posthoc.distributed import rank, world_size
from posthoc.utils.checks import check_positive_int

__all__ = ["make_loader", "shard"]


def shard(dataset: Dataset) -> Dataset:
    """This rank's contiguous part of ``dataset`` under torch.distributed (the dataset itself otherwise).

    Rank r of W gets indices [r N / W, (r + 1) N / W): concatenating the ranks'
    results in rank order restores the dataset's order.

    Raises:
        TypeError: Under torch.distributed, for a dataset without a length (e.g. an ``IterableDataset``).
    """
    world = world_size()
    if world == 1:
        return dataset
    if not isinstance(dataset, Sized):
        raise TypeError(f"cannot shard a {type(dataset).__name__} without a length; pass a map-style Dataset")
    n, r = len(dataset), rank()
    return Subset(dataset, range(r * n // world, (r + 1) * n // world))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A single-process ``DataLoader`` (``num_workers=0``).

    When ``shuffle`` is true the order comes from a ``torch.Generator`` seeded
    with ``seed``: two loaders built with the same seed give the same batches
    epoch after epoch (each epoch draws a new permutation from that
    generator). Without shuffling the order is the dataset's.
    """
    check_positive_int(batch_size, "batch_size", "examples per batch")
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=0, drop_last=drop_last)
