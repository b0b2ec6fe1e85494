"""The few collectives posthoc needs, each a no-op in a single process.

A fit under ``torchrun`` accumulates sums on each rank's shard of the data and
calls :func:`sum_over_ranks` once per data pass, so every rank ends with the
same totals; nothing here runs unless ``torch.distributed`` is initialised.
A collective that fails because a peer died or hung is re-raised as
:class:`PeerFailure` naming the rank, the quantity and the likely cause, so a
crashed rank makes the others stop instead of waiting forever (a peer that is
alive but silent is caught by the process group's timeout: set it with
``init_process_group(..., timeout=...)`` or :func:`init_from_env`).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist

if dist.is_available():
    # Imported now, before any process group exists: its functions take ``group=group.WORLD`` as a default,
    # evaluated at import. Imported after init_process_group (torch._dynamo imports it lazily, e.g. at the first
    # torch.func pullback of a fit), they hold the world group for good, so destroy_process_group left gloo's
    # worker and TCP threads and the TCPStore server running into interpreter shutdown.
    import torch.distributed.nn.functional  # noqa: F401


class PeerFailure(RuntimeError):
    """A collective could not complete: another rank exited, crashed or stopped answering."""


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank under torch.distributed, 0 when it is not initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes under torch.distributed, 1 when it is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files."""
    return rank() == 0


def _run(op, what: str):
    try:
        return op()
    except (RuntimeError, dist.DistBackendError) as err:  # gloo/nccl report a dead peer as RuntimeError
        raise PeerFailure(
            f"rank {rank()} of {world_size()}: the collective for {what} failed ({str(err).splitlines()[0]}); "
            "another rank exited, crashed or timed out; check its log, then restart every rank"
        ) from err


def sum_over_ranks(tensors: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
    """Element-wise sums over ranks of same-shaped tensors, in one all-reduce.

    Single process: the inputs are returned unchanged. Under torch.distributed
    the tensors are flattened into one buffer (one collective, whatever their
    number), summed, and returned as new tensors of the original shapes and
    dtypes. Every rank must pass tensors of the same shapes in the same order.
    """
    tensors = list(tensors)
    if not is_distributed() or not tensors:
        return tensors
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        raise TypeError("sum_over_ranks needs tensors of one dtype; reduce the others separately")
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    _run(lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM), what)
    return [part.reshape(t.shape) for part, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors, strict=True)]


def sum_count(count: int, what: str) -> int:
    """An integer (e.g. the number of examples seen) summed over ranks."""
    if not is_distributed():
        return count
    (total,) = sum_over_ranks([torch.tensor([count], dtype=torch.float64)], what)
    return int(round(float(total)))


def broadcast_object(obj: Any, what: str) -> Any:
    """Rank 0's ``obj`` (any picklable value) on every rank; single process: ``obj`` unchanged."""
    if not is_distributed():
        return obj
    box = [obj if rank() == 0 else None]
    _run(lambda: dist.broadcast_object_list(box, src=0), what)
    return box[0]


def gather_rows(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Concatenate (n_r, ...) tensors from every rank along dim 0, in rank order (n_r may differ).

    Used to gather sharded evaluation results; single process: returned unchanged.
    """
    if not is_distributed():
        return tensor
    gathered: list[Any] = [None] * world_size()
    _run(lambda: dist.all_gather_object(gathered, int(tensor.shape[0])), f"{what} (sizes)")
    sizes = [int(n) for n in gathered]
    padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    _run(lambda: dist.all_gather(parts, padded), what)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


def rank_slice(n: int) -> slice:
    """This rank's contiguous part of a batch of ``n`` items that every rank drew alike (all of it in one process).

    Rank r of W gets [r n / W, (r + 1) n / W), so gathering the parts in rank order restores the batch.
    """
    world = world_size()
    if world == 1:
        return slice(0, n)
    r = rank()
    return slice(r * n // world, (r + 1) * n // world)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward all-reduces the incoming gradient and keeps this rank's rows.

    Written out rather than taken from torch.distributed.nn.functional.all_gather: with torch 2.13 and
    gloo that function's backward gave wrong gradients for a gathered non-leaf (a network's output)
    in our 2-process check (tests/distributed/test_distributed_scalla.py), while a leaf came out right.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, what: str) -> torch.Tensor:
        ctx.what, ctx.n = what, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        _run(lambda: dist.all_gather(parts, tensor.contiguous()), what)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        _run(lambda: dist.all_reduce(grad, op=dist.ReduceOp.SUM), f"{ctx.what} (gradient)")
        start = rank() * ctx.n
        return grad[start:start + ctx.n], None


def gather_with_grad(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order, differentiable (single process: itself).

    The backward pass sums, into each rank's own rows, the gradients that every rank's copy of
    the result receives (so if every rank computes the same loss of the gathered tensor, each
    rank's gradient is ``world_size`` times its own share). All ranks must pass the same shape.
    """
    if not is_distributed():
        return tensor
    return _GatherRows.apply(tensor, what)


def sum_gradients(parameters: Sequence[torch.nn.Parameter], what: str = "the gradients",
                  scale: float = 1.0) -> None:
    """Replace each ``.grad`` by ``scale`` times its sum over ranks (one all-reduce; no-op in one process)."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    for grad, summed in zip(grads, sum_over_ranks(grads, what), strict=True):
        grad.copy_(summed * scale if scale != 1.0 else summed)


def check_same_on_all_ranks(value: torch.Tensor, what: str, rtol: float = 0.0,
                            fix: str = "every rank must start from the same model and settings") -> None:
    """Raise ValueError on every rank when ``value`` differs between ranks (e.g. the MAP weights or a setting).

    The sizes are compared first (one all-reduce of two numbers), so values of different lengths (e.g. models
    of different widths) give this error instead of a mismatched collective, which gloo answers by aborting
    the process. Then the elements: the largest spread between ranks must be at most ``rtol`` times the
    largest magnitude (two all-reduces). ``fix`` ends the message: what the user should change. No-op in
    one process.
    """
    if not is_distributed():
        return
    flat = value.detach().reshape(-1).to(torch.float64)
    n = flat.numel()
    sizes = torch.tensor([n, -n], dtype=torch.float64, device=flat.device)
    _run(lambda: dist.all_reduce(sizes, op=dist.ReduceOp.MAX), f"{what} (sizes)")
    largest, smallest = int(sizes[0]), -int(sizes[1])
    if largest != smallest:
        raise ValueError(f"the ranks disagree on {what}: {n} entries on rank {rank()}, between {smallest} and "
                         f"{largest} across the {world_size()} ranks; {fix}")
    low, high = flat.clone(), flat.clone()
    _run(lambda: dist.all_reduce(low, op=dist.ReduceOp.MIN), what)
    _run(lambda: dist.all_reduce(high, op=dist.ReduceOp.MAX), what)
    spread = float((high - low).abs().max()) if n else 0.0
    if spread > rtol * float(flat.abs().max() if n else 0.0):
        raise ValueError(f"the ranks disagree on {what} (largest difference {spread:.3g}); {fix}")


def shutdown(wait: bool = True) -> None:
    """End torch.distributed at the end of a run: wait for every rank (``wait``), then destroy the process group.

    The counterpart of :func:`init_from_env`; a no-op when torch.distributed is not initialised. ``wait=False``
    skips the barrier (after an error on this rank, when the others may never reach it). A process that exits
    without destroying its group tears gloo down during interpreter shutdown, which can abort the process.
    Import posthoc before creating the group yourself (:func:`init_from_env` does): see the import of
    torch.distributed.nn.functional above. Raises :class:`PeerFailure` if a peer died before the barrier.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait and world_size() > 1:
            _run(dist.barrier, "the barrier before shutdown")
    finally:
        dist.destroy_process_group()


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> bool:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Returns False (and does nothing) when not launched by torchrun. The backend
    defaults to nccl with CUDA, gloo otherwise; ``timeout_s`` bounds how long a
    rank waits for a silent peer before failing. End the run with :func:`shutdown`.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if dist.is_initialized():
        return True
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True
