"""Reading (x, y) pairs from any DataLoader: tuples, lists or dicts."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from posthoc.likelihood import Likelihood
from posthoc.utils.checks import check_finite, check_labels


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


def checked_batches(loader: Iterable, likelihood: Likelihood, n_outputs: int | None, dict_key_x: str,
                    dict_key_y: str, dtype: torch.dtype, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield validated (x, y) on the model's device: x finite (cast to ``dtype`` if floating), y labels in
    range (classification) or finite values (regression)."""
    for batch in loader:
        x, y = split_batch(batch, dict_key_x, dict_key_y)
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        check_finite(x, "inputs")
        y = y.to(device)
        if likelihood is Likelihood.CLASSIFICATION:
            if n_outputs is not None:
                y = check_labels(y.reshape(-1), n_outputs, "targets")
        else:
            y = check_finite(y.to(dtype), "targets")
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
