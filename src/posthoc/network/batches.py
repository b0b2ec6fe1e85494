"""Reading (x, y) pairs from any DataLoader: tuples, lists or mappings (dict, UserDict, BatchEncoding).

The model input x of a batch is any :data:`posthoc.network.inputs.ModelInputs` (a tensor, tuple or
mapping); :mod:`posthoc.network.inputs` has the helpers that slice, place and check it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Iterable, Iterator, Sized, cast

import torch
from torch.utils.data import DistributedSampler

from posthoc.likelihood import Likelihood
from posthoc.network.inputs import (
    InputSpec,
    ModelCall,
    ModelInputs,
    as_model_inputs,
    batch_size,
    check_finite_inputs,
    check_like,
    place,
    take,
)
from posthoc.network.positions import IGNORE_INDEX, check_position_targets
from posthoc.utils.checks import check_finite, check_labels

DEFAULT_KEYS = ("input_ids", "labels")  # laplace-torch's dict_key_x, dict_key_y
LEGACY_KEYS = ("input", "target")  # posthoc's keys before, read with their old meaning (deprecated)


def split_batch(batch: Any, dict_key_x: str, dict_key_y: str,
                mapping_inputs: bool = False) -> tuple[ModelInputs, torch.Tensor]:
    """(x, y) from a batch: a (x, y, ...) tuple/list, or a mapping (dict, UserDict, BatchEncoding).

    A mapping's target is ``batch[dict_key_y]``. With ``mapping_inputs`` (Laplace) its model input is every
    other entry, as a dict (``dict_key_x`` names the entry that gives the batch size; laplace-torch's
    meaning); deprecated (DeprecationWarning) there: with the keys ``("input", "target")``, or with the
    defaults ``("input_ids", "labels")`` on a batch that has ``"input"`` and ``"target"`` but not both
    defaults, the model input is ``batch["input"]`` alone, posthoc's meaning before. Without
    ``mapping_inputs`` (the estimators that take tensor inputs only, for now) it is ``batch[dict_key_x]``.

    Raises:
        KeyError: a mapping without one of the two keys. TypeError: any other batch.
    """
    if isinstance(batch, Mapping):
        keys = (dict_key_x, dict_key_y)
        legacy = all(k in batch for k in LEGACY_KEYS) and (
            keys == LEGACY_KEYS or (keys == DEFAULT_KEYS and not all(k in batch for k in keys)))
        if mapping_inputs and legacy:
            warnings.warn("a mapping batch read with the keys 'input'/'target' gives the model batch['input'] alone "
                          "(posthoc's old meaning, deprecated): the defaults are now laplace-torch's "
                          "dict_key_x='input_ids', dict_key_y='labels', and the model gets every entry but the "
                          "target. Use (x, y) tuples, or name your keys with dict_key_x= and dict_key_y=",
                          DeprecationWarning, stacklevel=3)
            return batch["input"], batch["target"]
        missing = [k for k in keys if k not in batch]
        if missing:
            raise KeyError(
                f"a mapping batch lacks key(s) {missing}; it has {sorted(batch)}. Pass dict_key_x= (the entry "
                "that gives the batch size) and dict_key_y= (the target entry)"
            )
        if not mapping_inputs:
            return batch[dict_key_x], batch[dict_key_y]
        return {k: v for k, v in batch.items() if k != dict_key_y}, batch[dict_key_y]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError("each batch must be an (x, y) tuple/list or a mapping with the input and target keys, got "
                    f"{type(batch).__name__}")


def check_unpadded_shards(loader: Iterable) -> None:
    """Raise ValueError for a loader whose DistributedSampler pads its shards with repeated examples.

    ``DistributedSampler(drop_last=False)`` over N examples on W ranks repeats W - N mod W examples so every
    shard has ceil(N / W): summed over ranks, the curvature, N and the log-likelihood would count them twice.
    """
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler) and sampler.total_size > len(cast(Sized, sampler.dataset)):
        n, ranks = len(cast(Sized, sampler.dataset)), sampler.num_replicas
        raise ValueError(f"the loader's DistributedSampler pads {n} examples to {sampler.total_size} for {ranks} "
                         "ranks by repeating some, which the sums over ranks would count twice; shard with "
                         "posthoc.data.loaders.shard(dataset) (an exact split), or use a data set whose size is a "
                         "multiple of the number of ranks")


def checked_batches(loader: Iterable, likelihood: Likelihood, n_outputs: int | None, dict_key_x: str,
                    dict_key_y: str, dtype: torch.dtype, device: torch.device,
                    input_shape: InputSpec | None = None, mapping_inputs: bool = False, position_dims: int = 0,
                    ignore_index: int = IGNORE_INDEX) -> Iterator[tuple[ModelInputs, torch.Tensor]]:
    """Yield validated (x, y) on the model's device, x finite (floating leaves cast to ``dtype``).

    One target per input: y class indices (B,) in range (classification) or finite values (regression).

    x is a tensor, tuple or mapping (:mod:`posthoc.network.inputs`); its batch size B is read from
    ``dict_key_x`` for mappings. With ``n_outputs`` C known, regression targets must be (B, C), or (B,) when
    C = 1, and classification labels (B,) or (B, 1) come back as (B,). With ``input_shape`` (an
    :func:`posthoc.network.inputs.input_spec`) every tensor input must be (B, *input_shape), and every tuple or
    mapping input have the same structure and per-leaf ranks (token lengths may vary between batches).
    ``mapping_inputs``: how a mapping batch splits (:func:`split_batch`). ``position_dims`` > 0: outputs
    (B, ..., C) with that many position dimensions, targets checked by
    :func:`posthoc.network.positions.check_position_targets` (labels may be ``ignore_index``).

    Raises:
        ValueError: non-finite values; inputs and targets with different batch sizes; one-hot or probability
            targets (B, C) for classification (pass ``y.argmax(-1)``); labels out of range; regression targets
            of another width than the outputs; binary targets not (B, K) in {0, 1} (:func:`check_binary_targets`); inputs shaped unlike ``input_shape``; a padding
            DistributedSampler (:func:`check_unpadded_shards`).
        TypeError: inputs that are not tensors (or tuples/mappings of them), or targets that are not a tensor.
    """
    check_unpadded_shards(loader)
    for batch in loader:
        x, y = split_batch(batch, dict_key_x, dict_key_y, mapping_inputs)
        x = as_model_inputs(x, "inputs")
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"batch targets must be a tensor, got {type(y).__name__}")
        x = check_finite_inputs(place(x, device, dtype), "inputs")
        if input_shape is not None:
            check_like(x, input_shape, "inputs", fitted=False)
        size = batch_size(x, dict_key_x)
        if y.ndim == 0 or y.shape[0] != size:
            shown = tuple(x.shape) if isinstance(x, torch.Tensor) else f"batch size {size}"
            raise ValueError(f"a batch has inputs of shape {shown} and targets of shape {tuple(y.shape)}; "
                             "both need the batch size first and one target per input")
        y = y.to(device)
        if position_dims:
            yield x, check_position_targets(y, likelihood, n_outputs, position_dims, ignore_index, dtype)
            continue
        if likelihood is Likelihood.CLASSIFICATION:
            if y.ndim == 2 and y.shape[1] > 1:
                raise ValueError(f"classification targets must be class indices of shape (B,), got {tuple(y.shape)} "
                                 "(one-hot or probability vectors?); pass the class indices, y.argmax(-1)")
            if n_outputs == 1:
                raise ValueError("likelihood='classification' needs C >= 2 outputs (a softmax over one class is "
                                 "always 1); a model with one logit per input is a binary classifier: "
                                 "likelihood='binary'")
            if n_outputs is not None:
                y = check_labels(y.reshape(-1) if y.ndim == 2 else y, n_outputs, "targets")
        elif likelihood is Likelihood.BINARY:
            y = check_binary_targets(y, n_outputs, dtype)
        else:
            y = check_finite(y.to(dtype), "targets")
            if n_outputs is not None and not (y.shape[1:] == (n_outputs,) or (n_outputs == 1 and y.ndim == 1)):
                raise ValueError(f"regression targets of shape {tuple(y.shape)} do not match the model's {n_outputs} "
                                 f"output(s): give targets of shape (B, {n_outputs})"
                                 + (" or (B,)" if n_outputs == 1 else ""))
        yield x, y


def check_binary_targets(y: torch.Tensor, n_outputs: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Targets of independent Bernoulli outputs (``Likelihood.BINARY``): (B, K) in {0, 1}, returned in ``dtype``.

    Float, integer or bool targets are accepted; (B,) is accepted for K = 1 (a single-logit binary classifier)
    and returned as (B, 1). With ``n_outputs`` None (the first batch, before the model's K is known) only the
    values are checked.

    Raises:
        ValueError: values other than 0 and 1 (NaN included; soft labels are not Bernoulli outcomes), or a shape
            other than (B, K) ((B,) for K = 1).
    """
    bad = ~((y == 0) | (y == 1))
    if bool(bad.any()):
        raise ValueError(f"binary targets must be 0 or 1 (one Bernoulli outcome per output), got "
                         f"{y[bad].reshape(-1)[0].item()!r}; for class indices of a softmax head use "
                         "likelihood='classification'")
    if n_outputs is not None and not (y.shape[1:] == (n_outputs,) or (n_outputs == 1 and y.ndim == 1)):
        raise ValueError(f"binary targets of shape {tuple(y.shape)} do not match the model's {n_outputs} "
                         f"output(s): give targets of shape (B, {n_outputs}) in {{0, 1}}"
                         + (" or (B,)" if n_outputs == 1 else ""))
    if y.ndim == 1 and n_outputs == 1:
        y = y.unsqueeze(-1)
    if n_outputs is None and y.ndim not in (1, 2):
        raise ValueError(f"binary targets must be (B, K) in {{0, 1}} ((B,) for one logit), got {tuple(y.shape)}")
    return y.to(dtype)


def prediction_inputs(x: Any, spec: InputSpec | None, dict_key_y: str, device: torch.device,
                      dtype: torch.dtype) -> ModelInputs:
    """Inputs to predict on, read like a training batch's x: a tensor, tuple or mapping, placed and checked.

    A mapping's ``dict_key_y`` entry (the target), if present, is dropped. With ``spec`` (the training inputs'
    :func:`posthoc.network.inputs.input_spec`) a tensor must have their number of dimensions, a tuple or
    mapping their structure.

    Raises:
        TypeError: not a tensor or a tuple/mapping of tensors (or a container where the training inputs were
            one tensor). ValueError: NaN/Inf, or shaped unlike the training inputs.
    """
    if isinstance(x, Mapping):
        x = {k: v for k, v in x.items() if k != dict_key_y}
    if spec is not None and isinstance(spec, tuple) and not isinstance(x, torch.Tensor):
        check_like(x, spec, "x", fitted=True)  # raises the TypeError naming the expected tensor shape
    x = check_finite_inputs(place(as_model_inputs(x, "x"), device, dtype), "x")
    if spec is not None:
        check_like(x, spec, "x", fitted=True)
    return x


def first_batch_inputs(loader: Iterable, model: torch.nn.Module, likelihood: Likelihood, dict_key_x: str,
                       dict_key_y: str, dtype: torch.dtype, device: torch.device,
                       call: ModelCall | None = None, mapping_inputs: bool = False) -> tuple[ModelInputs, int]:
    """The first batch's checked inputs and the model's number of outputs C (one forward of one example).

    ``call`` (default ``ModelCall(model)``) says how the model takes the inputs and which output it gives;
    ``mapping_inputs``: how a mapping batch splits (:func:`split_batch`).

    Raises:
        ValueError: an empty loader, or a model whose outputs are not (B, C).
    """
    first = next(iter(loader), None)
    if first is None:
        raise ValueError("the training loader yielded no batches: nothing to fit")
    x0, _ = next(iter(checked_batches([first], likelihood, None, dict_key_x, dict_key_y, dtype, device,
                                      mapping_inputs=mapping_inputs)))
    call = ModelCall(model) if call is None else call
    with torch.no_grad():
        out0 = call(take(x0, 0, 1))
    if out0.ndim != 2:
        raise ValueError(f"the model must return (B, C) outputs, got {tuple(out0.shape)}")
    return x0, out0.shape[-1]
