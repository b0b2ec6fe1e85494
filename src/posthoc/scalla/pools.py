"""ScaLLA's input pools and input shape checks.

A pool holds every training (or context) input of a loader, indexable by position; the checks compare inputs
with the training inputs' shape.
"""

from __future__ import annotations

from typing import Any, Iterable, Sized, cast

import torch
from torch.utils._pytree import tree_map
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler, TensorDataset

from posthoc.network.batches import split_batch
from posthoc.network.inputs import (
    InputSpec,
    ModelInputs,
    as_model_inputs,
    batch_size,
    check_finite_inputs,
    concat,
    describe,
    input_spec,
    place,
    select,
)
from posthoc.utils.checks import batch_shape


def _visits_every_example_once(loader: Iterable) -> bool:
    """True for a DataLoader whose batches hold each example of its dataset exactly once.

    That is sequential or shuffled without replacement, with no dropped last batch, so its TensorDataset's tensor
    is the loader's data.
    """
    sampler, batch_sampler = getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)
    whole = type(sampler) is SequentialSampler or (type(sampler) is RandomSampler and not sampler.replacement
                                                   and sampler.num_samples == len(sampler.data_source))
    n_examples = len(cast(Sized, sampler)) if whole else 0
    return (whole and type(batch_sampler) is BatchSampler and batch_sampler.sampler is sampler
            and (not batch_sampler.drop_last or n_examples % batch_sampler.batch_size == 0))


class InputPool:
    """The inputs of a loader, indexable by position (a TensorDataset's tensor, else read once into memory).

    The inputs are a tensor (N, ...) or a tuple/mapping of them (token ids and attention masks), read from the
    batches as Laplace reads them (:func:`posthoc.network.batches.split_batch`); a batch may also be a bare
    tensor (context loaders).

    Raises:
        ValueError: an empty loader, or batches whose inputs differ in structure or shape (token inputs padded
            to different lengths). TypeError: inputs that are not tensors or tuples/mappings of tensors.
    """

    def __init__(self, loader: Iterable, name: str, dtype: torch.dtype, device: torch.device,
                 dict_key_x: str = "input_ids", dict_key_y: str = "labels") -> None:
        dataset = getattr(loader, "dataset", None)
        x: ModelInputs
        if isinstance(dataset, TensorDataset) and _visits_every_example_once(loader):
            x = dataset.tensors[0]
        else:
            parts: list[ModelInputs] = []
            for batch in loader:
                inputs = batch if isinstance(batch, torch.Tensor) else split_batch(
                    batch, dict_key_x, dict_key_y, mapping_inputs=True)[0]
                parts.append(as_model_inputs(inputs, f"the {name} inputs"))
            if not parts:
                raise ValueError(f"the {name} loader yielded no batches")
            shapes = {str(_example_shape(part)) for part in parts}
            if len(shapes) > 1:
                raise ValueError(f"the {name} batches hold inputs of different shapes {sorted(shapes)[:2]}; ScaLLA "
                                 "pools all inputs: give every batch the same shapes (pad token inputs to one "
                                 "length, e.g. the tokenizer's padding='max_length')")
            x = concat(parts)
        if batch_size(x) == 0:
            raise ValueError(f"the {name} data are empty")
        self.inputs, self.name, self.dtype, self.device = x, name, dtype, device

    def __len__(self) -> int:
        return batch_size(self.inputs)

    @property
    def example_shape(self) -> Any:
        """The shape of one input (without the batch dimension); for a tuple or mapping, one per leaf."""
        return _example_shape(self.inputs)

    def take(self, index: torch.Tensor) -> ModelInputs:
        """The inputs at positions ``index`` (k,) on the device, floats in the dtype; ValueError if not finite."""
        x = place(select(self.inputs, index), self.device, self.dtype)
        return check_finite_inputs(x, f"{self.name} inputs")


def _example_shape(x: ModelInputs) -> Any:
    """``x.shape[1:]`` for a tensor; the same structure with each leaf's ``shape[1:]`` for a tuple or mapping."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape[1:])
    return tree_map(lambda t: tuple(t.shape[1:]) if isinstance(t, torch.Tensor) else t, x)


def is_tensor_spec(spec: Any) -> bool:
    """Whether an input shape is one tensor's example shape (a tuple of ints), not a tuple/mapping's spec."""
    return isinstance(spec, tuple) and all(isinstance(d, int) for d in spec)


def check_fitted_shape(x: ModelInputs, spec: InputSpec | None, name: str) -> None:
    """Raise unless ``x`` is shaped like the training inputs whose :func:`input_spec` is ``spec`` (None: no check).

    A tensor needs the same example shape; a tuple or mapping the same structure and per-leaf ranks.

    Raises:
        TypeError: a tuple or mapping where the training inputs were a tensor. ValueError: another shape.
    """
    if spec is None:
        return
    if is_tensor_spec(spec):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {batch_shape(spec)} like the training "
                            f"inputs, got {type(x).__name__}")
        if tuple(x.shape[1:]) != spec:
            raise ValueError(f"{name} must have shape {batch_shape(spec)}, the shape "
                             f"of the inputs ScaLLA was fitted on; got {tuple(x.shape)}")
        return
    if input_spec(x) != spec:
        raise ValueError(f"{name} must have the structure of the inputs ScaLLA was fitted on, {describe(spec)}; "
                         f"got {describe(input_spec(x))}")
