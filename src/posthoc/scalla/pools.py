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
    ModelInputs,
    as_model_inputs,
    batch_size,
    check_finite_inputs,
    concat,
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

    @classmethod
    def of_tensor(cls, inputs: torch.Tensor, name: str, dtype: torch.dtype, device: torch.device) -> "InputPool":
        """A pool holding the tensor ``inputs`` (N, ...) as they are (no loader read)."""
        pool = cls.__new__(cls)
        pool.inputs, pool.name, pool.dtype, pool.device = inputs, name, dtype, device
        return pool


def jittered_pool(train_pool: InputPool, n_points: int, scale: float, seed: int) -> InputPool | None:
    """``n_points`` training inputs drawn with replacement plus Gaussian noise, as a pool named "jittered".

    The noise of each input feature has standard deviation ``scale`` times that feature's standard deviation over
    the training inputs. The default ScaLLA fills its target set with these when it has no context points and
    fewer training inputs than ``n_target_points`` (benchmarks/results/scalla_defaults.md): a surrogate fitted on
    150 points in 20 dimensions learned the kernel there but not between them. Seeded by ``seed`` alone (the global
    RNG is untouched). Returns None where there is nothing to add or noise has no meaning: ``n_points`` or
    ``scale`` <= 0, fewer than two training inputs, or inputs that are not one floating tensor (token ids,
    tuples, mappings). Cost: O(n_points x input size) memory and time.
    """
    x = train_pool.inputs
    if (n_points <= 0 or scale <= 0 or not isinstance(x, torch.Tensor) or not x.is_floating_point()
            or batch_size(x) < 2):
        return None
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(batch_size(x), (n_points,), generator=generator)
    noise = torch.randn((n_points, *x.shape[1:]), generator=generator, dtype=x.dtype).to(x.device)
    jittered = x[index.to(x.device)] + scale * x.std(0, keepdim=True) * noise
    return InputPool.of_tensor(jittered, "jittered", train_pool.dtype, train_pool.device)


def _example_shape(x: ModelInputs) -> Any:
    """``x.shape[1:]`` for a tensor; the same structure with each leaf's ``shape[1:]`` for a tuple or mapping."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape[1:])
    return tree_map(lambda t: tuple(t.shape[1:]) if isinstance(t, torch.Tensor) else t, x)


def is_tensor_spec(spec: Any) -> bool:
    """Whether an input shape is one tensor's example shape (a tuple of ints), not a tuple/mapping's spec."""
    return isinstance(spec, tuple) and all(isinstance(d, int) for d in spec)


def context_pool_of(context_loader: Iterable | None, train_pool: InputPool, n_target_points: int, jitter: float,
                    seed: int, dict_key_x: str = "input_ids", dict_key_y: str = "labels") -> InputPool | None:
    """ScaLLA's context pool: the context loader's inputs, else (``jitter`` > 0) :func:`jittered_pool`'s fill.

    Without a context loader the fill tops the target set up to ``n_target_points`` inputs (None if the training
    inputs already fill it or cannot be jittered).

    Raises:
        ValueError: context inputs shaped unlike the training inputs, or an empty context loader.
    """
    if context_loader is None:
        return jittered_pool(train_pool, n_target_points - len(train_pool), jitter, seed)
    pool = InputPool(context_loader, "context", train_pool.dtype, train_pool.device, dict_key_x, dict_key_y)
    if pool.example_shape != train_pool.example_shape:
        shown = [batch_shape(s) if is_tensor_spec(s) else str(s)
                 for s in (pool.example_shape, train_pool.example_shape)]
        raise ValueError(f"context inputs have shape {shown[0]} but training inputs {shown[1]}; context points must "
                         "be valid inputs of the network (token inputs padded to the training inputs' length)")
    return pool
