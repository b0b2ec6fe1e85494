"""Data-parallel fitting on torch.distributed (gloo on CPU, nccl on GPUs).

Run the same script under ``torchrun``; give each rank its shard of the data
(a ``DistributedSampler``, :func:`posthoc.data.loaders.make_loader` with
``shard=True``, or your own split; ScaLLA instead takes the same loaders on
every rank). Curvature sums and example counts are all-reduced once per data
pass, so every rank holds the same posterior. End the run with :func:`shutdown`
(a barrier, then destroy the process group). In a single process none of this
calls torch.distributed.
"""

from posthoc.distributed.collectives import (
    PeerFailure,
    broadcast_object,
    check_same_on_all_ranks,
    gather_rows,
    gather_with_grad,
    init_from_env,
    is_distributed,
    is_main_process,
    rank,
    rank_slice,
    shutdown,
    sum_count,
    sum_gradients,
    sum_over_ranks,
    world_size,
)

__all__ = [
    "PeerFailure",
    "broadcast_object",
    "check_same_on_all_ranks",
    "gather_rows",
    "gather_with_grad",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "rank",
    "rank_slice",
    "shutdown",
    "sum_count",
    "sum_gradients",
    "sum_over_ranks",
    "world_size",
]
