"""Reading (x, y) pairs from any DataLoader: tuples, lists or dicts."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import DistributedSampler

from posthoc.likelihood import Likelihood
from posthoc.utils.checks import batch_shape, check_finite, check_labels


def split_batch(batch: Any, dict_key_x: str, dict_key_y: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a batch: a (x, y, ...) tuple/list, or a dict read with the two keys."""
    if isinstance(batch, dict):
        missing = [k for k in (dict_key_x, dict_key_y) if k not in batch]
        if missing:
            raise KeyError(
                f"a dict batch lacks key(s) {missing}; it has {sorted(batch)}. Pass dict_key_x= and "
                "dict_key_y= naming the input and target entries"
            )
        return batch[dict_key_x], batch[dict_key_y]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError("each batch must be an (x, y) tuple/list or a dict with the input and target keys")


def check_unpadded_shards(loader: Iterable) -> None:
    """Raise ValueError for a loader whose DistributedSampler pads its shards with repeated examples.

    ``DistributedSampler(drop_last=False)`` over N examples on W ranks repeats W - N mod W examples so every
    shard has ceil(N / W): summed over ranks, the curvature, N and the log-likelihood would count them twice.
    """
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler) and sampler.total_size > len(sampler.dataset):
        n, ranks = len(sampler.dataset), sampler.num_replicas
        raise ValueError(f"the loader's DistributedSampler pads {n} examples to {sampler.total_size} for {ranks} "
                         "ranks by repeating some, which the sums over ranks would count twice; shard with "
                         "posthoc.data.loaders.shard(dataset) (an exact split), or use a data set whose size is a "
                         "multiple of the number of ranks")


def checked_batches(loader: Iterable, likelihood: Likelihood, n_outputs: int | None, dict_key_x: str,
                    dict_key_y: str, dtype: torch.dtype, device: torch.device,
                    input_shape: tuple[int, ...] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield validated (x, y) on the model's device: x finite (cast to ``dtype`` if floating) with one target per
    input, and y class indices (B,) in range (classification) or finite values (regression).

    With ``n_outputs`` C known, regression targets must be (B, C), or (B,) when C = 1, and classification labels
    (B,) or (B, 1) come back as (B,). With ``input_shape`` every input must be (B, *input_shape).

    Raises:
        ValueError: non-finite values; inputs and targets with different batch sizes; one-hot or probability
            targets (B, C) for classification (pass ``y.argmax(-1)``); labels out of range; regression targets
            of another width than the outputs; inputs shaped unlike ``input_shape``; a padding
            DistributedSampler (:func:`check_unpadded_shards`).
    """
    check_unpadded_shards(loader)
    for batch in loader:
        x, y = split_batch(batch, dict_key_x, dict_key_y)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"batches must hold tensors, got inputs {type(x).__name__} and targets {type(y).__name__}")
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        check_finite(x, "inputs")
        if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
            raise ValueError(f"inputs of shape {tuple(x.shape)}, but the first batch had inputs of shape "
                             f"{batch_shape(input_shape)}; every batch must have the same input shape")
        if x.ndim == 0 or y.ndim == 0 or y.shape[0] != x.shape[0]:
            raise ValueError(f"a batch has inputs of shape {tuple(x.shape)} and targets of shape {tuple(y.shape)}; "
                             "both need the batch size first and one target per input")
        y = y.to(device)
        if likelihood is Likelihood.CLASSIFICATION:
            if y.ndim == 2 and y.shape[1] > 1:
                raise ValueError(f"classification targets must be class indices of shape (B,), got {tuple(y.shape)} "
                                 "(one-hot or probability vectors?); pass the class indices, y.argmax(-1)")
            if n_outputs is not None:
                y = check_labels(y.reshape(-1) if y.ndim == 2 else y, n_outputs, "targets")
        else:
            y = check_finite(y.to(dtype), "targets")
            if n_outputs is not None and not (y.shape[1:] == (n_outputs,) or (n_outputs == 1 and y.ndim == 1)):
                raise ValueError(f"regression targets of shape {tuple(y.shape)} do not match the model's {n_outputs} "
                                 f"output(s): give targets of shape (B, {n_outputs})"
                                 + (" or (B,)" if n_outputs == 1 else ""))
        yield x, y


def first_batch_inputs(loader: Iterable, model: torch.nn.Module, likelihood: Likelihood, dict_key_x: str,
                       dict_key_y: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, int]:
    """The first batch's checked inputs and the model's number of outputs C (one forward of one example).

    Raises ValueError for an empty loader or a model whose outputs are not (B, C).
    """
    first = next(iter(loader), None)
    if first is None:
        raise ValueError("the training loader yielded no batches: nothing to fit")
    x0, _ = next(iter(checked_batches([first], likelihood, None, dict_key_x, dict_key_y, dtype, device)))
    with torch.no_grad():
        out0 = model(x0[:1])
    if out0.ndim != 2:
        raise ValueError(f"the model must return (B, C) outputs, got {tuple(out0.shape)}")
    return x0, out0.shape[-1]
