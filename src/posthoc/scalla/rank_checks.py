"""The checks that every rank gives ``ScaLLA.fit`` the same data.

``ScaLLA.fit`` splits each batch over the ranks itself, so a sharded loader (DistributedSampler) or ranks
reading different inputs would silently fit on part of the data.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.utils.data import DistributedSampler

from posthoc.network.inputs import ModelInputs, batch_size, tensor_leaves

SAME_LOADERS = ("ScaLLA.fit takes the same loaders on every rank (it splits each batch over the ranks itself): "
                "give every rank the same, unsharded loader with the same order (no DistributedSampler, the same "
                "shuffle seed)")


def check_not_sharded(loader: Iterable | None) -> None:
    """Raise ValueError for a loader with a DistributedSampler over several ranks (before any work is done)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1:
        raise ValueError(f"the loader has a DistributedSampler (a shard per rank): {SAME_LOADERS}")


def input_digest(x: ModelInputs, offset: int = 0, chunk: int = 4096) -> torch.Tensor:
    """A float64 digest (4,) of inputs x (n, ...): [n, sum x, sum_i (offset + i + 1) sum x_i, sum x^2].

    Equal on two ranks when they hold the same inputs in the same order (a shard or a reordering changes it).
    For a tuple or mapping of tensors the sums run over all its tensors. Cost: one pass over x.
    """
    out = torch.zeros(4, dtype=torch.float64)
    out[0] = batch_size(x)
    for leaf in tensor_leaves(x):
        n = leaf.shape[0]
        for start in range(0, n, chunk):
            rows = leaf[start:start + chunk].detach().reshape(min(chunk, n - start), -1).to(torch.float64).cpu()
            sums = rows.sum(1)
            position = torch.arange(offset + start + 1, offset + start + 1 + rows.shape[0], dtype=torch.float64)
            out[1:] += torch.stack([sums.sum(), (position * sums).sum(), rows.square().sum()])
    return out
