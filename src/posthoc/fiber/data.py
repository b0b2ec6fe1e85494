"""The fiber walk's training data: every batch read once, checked and put in a canonical order; prediction inputs.

The walk pools the whole training set (or its last-layer features) so that minibatches, the NLL subsample and
the all-data check index one tensor (or tuple/mapping of tensors). Outputs with positions, (B, ..., C), come
with (N, ...) class targets (the ignore index at skipped positions) or (N, ..., C) values
(:mod:`posthoc.network.positions`).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from posthoc.fiber.particles import vectorises_over_particles
from posthoc.fiber.walk import FiberProblem
from posthoc.likelihood import Likelihood
from posthoc.network.batches import checked_batches, prediction_inputs
from posthoc.network.inputs import ModelCall, ModelInputs, batch_size, concat, input_spec, select, take, tensor_leaves
from posthoc.network.positions import IGNORE_INDEX, check_layout, first_batch_layout
from posthoc.network.subset import ParameterSubset
from posthoc.utils.checks import batch_shape, check_integer_labels


def canonical_training_data(train_loader: Iterable, subset: ParameterSubset, likelihood: Likelihood,
                            dict_key_x: str, dict_key_y: str, position_dims: int = 0,
                            ignore_index: int = IGNORE_INDEX) -> tuple[ModelInputs, torch.Tensor, Any]:
    """The whole loader's covered-module inputs, targets and input shape, in a canonical order.

    Batches are read as Laplace reads them (:func:`posthoc.network.batches.checked_batches`: (x, y) tuples, or
    mappings with the target under ``dict_key_y`` whose other entries are the model input). Returns the covered
    module's inputs (N, ...; a tuple or mapping of them for such model inputs), the targets (N,) labels or (N, C)
    values (``position_dims`` > 0, outputs (B, ..., C): (N, ...) labels, -100 at the positions whose target is
    ``ignore_index``, whatever its value, so that the walk reads one spelling, or (N, ..., C) values), sorted by a
    fixed random projection of each example so the walk does not depend on the loader's shuffling, and the shape of
    one model input (a tuple; for a tuple or mapping input, its :func:`posthoc.network.inputs.input_spec`). Memory:
    the whole training set (or its last-layer features).

    Raises:
        ValueError: for an empty loader, batches of different example shapes (token inputs padded to different
            lengths), a model whose outputs are not (B, C) (or (B, ..., C) with ``position_dims`` positions),
            targets that do not fit them, or classification targets all equal to the ignore index.
        TypeError: inputs that are not tensors or tuples/mappings of tensors.
    """
    xs: list[ModelInputs] = []
    ys: list[torch.Tensor] = []
    input_shape: Any = ()
    shapes: Any = None
    for x, y in checked_batches(train_loader, likelihood, None, dict_key_x, dict_key_y, subset.dtype, subset.device,
                                mapping_inputs=True, position_dims=position_dims, ignore_index=ignore_index):
        example = _example_shapes(x)
        if not xs:
            input_shape = tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else input_spec(x)
            shapes = example
        elif example != shapes:
            shown = [batch_shape(s) if isinstance(s, tuple) else str(s) for s in (shapes, example)]
            raise ValueError(f"the training batches have inputs of shapes {shown[0]} and {shown[1]}; every batch must "
                             "hold examples of one shape (pad token inputs to one length)")
        xs.append(subset.inputs(x))  # x itself or the last layer's features
        ys.append(y)
    if not xs:
        raise ValueError("the training loader yielded no batches: nothing to fit")
    inputs, targets = concat(xs), torch.cat(ys)
    n_data = batch_size(inputs)
    targets = _checked_targets(subset, inputs, targets, likelihood, position_dims, ignore_index)
    # integer inputs (token ids) are ordered by the same projection, taken in float64; a tuple or mapping by the
    # sum of its tensors' projections
    generator = torch.Generator().manual_seed(12345)
    key: torch.Tensor | None = None
    for leaf in tensor_leaves(inputs):
        key_dtype = leaf.dtype if leaf.is_floating_point() else torch.float64
        probe = torch.randn(leaf[0].numel(), generator=generator, dtype=key_dtype).to(leaf.device)
        projected = leaf.reshape(n_data, -1).to(key_dtype) @ probe
        key = projected if key is None else key + projected.to(key.dtype)
    assert key is not None  # concat kept at least one tensor
    key = key + 1e-3 * targets.reshape(n_data, -1).to(key.dtype).sum(-1)
    order = torch.argsort(key, stable=True)
    return select(inputs, order), targets[order], input_shape


def _checked_targets(subset: ParameterSubset, inputs: ModelInputs, targets: torch.Tensor, likelihood: Likelihood,
                     position_dims: int, ignore_index: int) -> torch.Tensor:
    """The targets of all N examples checked against the covered function's outputs; one forward of one example.

    Positions whose class target is ``ignore_index`` come back as -100 (:data:`IGNORE_INDEX`).
    """
    with torch.no_grad():
        out = subset.forward(take(inputs, 0, 1))
    if out.ndim != 2 + position_dims:
        expected = "(B, C)" if not position_dims else f"(B, ..., C) with {position_dims} position dimension(s)"
        raise ValueError(f"the model must return {expected} outputs, got {tuple(out.shape)}")
    n_data, n_out = batch_size(inputs), out.shape[-1]
    if position_dims:
        check_layout((n_data, *out.shape[1:]), tuple(targets.shape), likelihood)
    if likelihood is Likelihood.CLASSIFICATION:
        targets = check_integer_labels(targets, "targets").reshape(n_data, *out.shape[1:-1]).long()
        skipped = targets == ignore_index if position_dims else torch.zeros_like(targets, dtype=torch.bool)
        labels = targets[~skipped]
        if labels.numel() == 0:
            raise ValueError(f"every training target is the ignore index ({ignore_index}): no position to fit")
        if int(labels.min()) < 0 or int(labels.max()) >= n_out:
            raise ValueError(f"class labels must lie in [0, {n_out - 1}]"
                             + (f" or be the ignore index {ignore_index}" if position_dims else ""))
        return torch.where(skipped, IGNORE_INDEX, targets)
    targets = targets.reshape(n_data, *out.shape[1:-1], -1)
    if targets.shape[-1] != n_out:
        raise ValueError(f"targets have {targets.shape[-1]} outputs, the model {n_out}")
    return targets


def is_tensor_spec(spec: Any) -> bool:
    """Whether an input shape is one tensor's (a tuple of ints) or unknown (None), not a tuple/mapping's spec."""
    return spec is None or isinstance(spec, tuple) and all(isinstance(d, int) for d in spec)


def prediction_model_inputs(x: Any, spec: Any, dict_key_y: str, device: torch.device,
                            dtype: torch.dtype) -> ModelInputs:
    """Inputs to predict on, placed, finite and shaped like the training inputs (``spec``).

    A tensor ``spec`` asks for (B, *spec); a tuple/mapping spec for the training inputs' structure
    (:func:`posthoc.network.batches.prediction_inputs`; a mapping's ``dict_key_y`` entry is dropped).

    Raises:
        TypeError: not a tensor where the training inputs were one. ValueError: another shape or NaN/Inf.
    """
    if is_tensor_spec(spec):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape {batch_shape(spec)}, got {type(x).__name__}")
        if spec is not None and tuple(x.shape[1:]) != spec or x.ndim == 0:
            raise ValueError(f"x must have shape {batch_shape(spec)} like the training inputs, got "
                             f"{tuple(x.shape)}" + (" (a single example needs a batch dimension: x[None])"
                                                    if tuple(x.shape) == spec else ""))
        spec = None
    return prediction_inputs(x, spec, dict_key_y, device, dtype)


def _example_shapes(x: ModelInputs) -> Any:
    """One example's full shape: ``x.shape[1:]``, or the structure of a tuple/mapping with each leaf's."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape[1:])
    return [(tuple(t.shape[1:]), t.dtype) for t in tensor_leaves(x)]


def training_problem(subset: ParameterSubset, call: ModelCall, train_loader: Iterable, likelihood: Likelihood,
                     dict_keys: tuple[str, str], prior_precision: torch.Tensor,
                     sigma_noise: float | None, ignore_index: int = IGNORE_INDEX) -> tuple[FiberProblem, Any]:
    """The walk's problem from the training loader, and the shape of one model input.

    Reads the first batch (:func:`posthoc.network.positions.first_batch_layout`: outputs (B, C) or (B, ..., C)),
    locates the last layer there (``subset.capture``), pools the data (:func:`canonical_training_data`), estimates
    the regression noise as the MAP's training residual RMS when ``sigma_noise`` is None (classification: 1), and
    probes whether the covered function vmaps over particles
    (:func:`posthoc.fiber.particles.vectorises_over_particles`). ``dict_keys``: (dict_key_x, dict_key_y). Cost:
    one pass over the loader, a forward pass over the data for the noise estimate, and the probe's forward pass.

    Raises:
        ValueError, TypeError: as :func:`canonical_training_data` and ``first_batch_layout``.
    """
    x0, _, position_dims = first_batch_layout(train_loader, call, likelihood, *dict_keys, subset.dtype, subset.device,
                                              mapping_inputs=True, ignore_index=ignore_index)
    subset.capture(x0)  # for last_layer, also locates the layer on the first batch
    inputs, targets, input_shape = canonical_training_data(train_loader, subset, likelihood, *dict_keys,
                                                           position_dims=position_dims, ignore_index=ignore_index)
    noise = torch.as_tensor(1.0 if sigma_noise is None else sigma_noise, dtype=subset.dtype, device=subset.device)
    if likelihood is Likelihood.REGRESSION and sigma_noise is None:
        with torch.no_grad():
            resid = torch.cat([targets[i:i + 4096] - subset.forward(take(inputs, i, i + 4096))
                               for i in range(0, batch_size(inputs), 4096)])
        noise = resid.pow(2).mean().sqrt().clamp_min(1e-6).to(subset.dtype)
    problem = FiberProblem(subset, inputs, targets, likelihood, prior_precision, noise,
                           vectorise=vectorises_over_particles(subset, inputs))
    return problem, input_shape
