"""Model inputs of any shape a user brings, and calling the model on them.

A batch's model input ``x`` is a tensor (B, ...), a tuple or list of inputs, or a mapping of inputs
(``dict``, ``collections.UserDict``, Hugging Face ``BatchEncoding``; kept as a plain ``dict``). Its tensor
leaves all have the batch size B first. The helpers below do to such an input what indexing and ``.to`` do
to a tensor: batch size, slicing examples [a:b], concatenation, device/dtype placement (floating leaves only:
token ids and masks keep their integer dtype), finiteness checks and shape specs.

:class:`ModelCall` calls the model on such an input and reads its output:

- a tensor or a tuple/list goes to ``model.forward`` as one argument (laplace-torch does ``model(X)``);
- a mapping goes as keyword arguments (every Hugging Face model: ``model(**batch)``) when every key names a
  parameter of ``model.forward`` (or ``forward`` takes ``**kwargs`` and no required positional argument),
  and as one argument otherwise (laplace-torch's documented wrapper, ``forward(self, data)`` reading
  ``data["input_ids"]``). The choice is read from ``inspect.signature(model.forward)``, never by trying a
  call; ``mapping_call="kwargs"`` or ``"argument"`` forces it;
- the output is the model's tensor, the first element of a tuple/list, the ``"logits"`` entry of a mapping
  or Hugging Face ``ModelOutput``, or what ``output_fn(raw_output)`` returns for anything else.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from contextlib import contextmanager
from enum import Enum
from typing import Any, Callable, Iterator, Sequence, Union

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from posthoc.utils.checks import batch_shape, check_choice, check_finite

ModelInputs = Union[torch.Tensor, tuple, list, dict]
InputSpec = Any  # what :func:`input_spec` returns: a nested structure of per-leaf example shapes


class MappingCall(str, Enum):
    """How a mapping input reaches ``model.forward``."""

    AUTO = "auto"  # from the signature of model.forward
    KWARGS = "kwargs"  # model(**x)
    ARGUMENT = "argument"  # model(x)


def as_model_inputs(x: Any, what: str = "x") -> ModelInputs:
    """``x`` checked to be a tensor, or a tuple/list/mapping whose leaves are tensors; mappings become dicts.

    Nested containers are allowed; ``None`` entries are kept (a model's optional argument). Cost: one walk
    over the containers (no copy of tensor data).

    Raises:
        TypeError: a leaf that is not a tensor (or None), a mapping with non-string keys, or an input without
            any tensor.
    """
    def convert(node: Any) -> Any:
        if isinstance(node, torch.Tensor) or node is None:
            return node
        if isinstance(node, Mapping):
            if not all(isinstance(k, str) for k in node):
                raise TypeError(f"{what}: a mapping input needs string keys, got {list(node)[:4]}")
            return {k: convert(v) for k, v in node.items()}
        if isinstance(node, (tuple, list)):
            return type(node)(convert(v) for v in node) if type(node) in (tuple, list) else tuple(map(convert, node))
        raise TypeError(f"{what} must be a tensor, or a tuple/list/mapping of tensors; found a "
                        f"{type(node).__name__} (convert it to a tensor, or pass the model a wrapper that builds it)")

    out = convert(x)
    if not tensor_leaves(out):
        raise TypeError(f"{what} holds no tensor; give the model inputs as a tensor, tuple or mapping of tensors")
    return out


def tensor_leaves(x: ModelInputs) -> list[torch.Tensor]:
    """The tensor leaves of ``x`` in pytree order."""
    return [leaf for leaf in tree_flatten(x)[0] if isinstance(leaf, torch.Tensor)]


def batch_size(x: ModelInputs, key: str | None = None) -> int:
    """B: the leading size of ``x``'s tensors (a mapping's entry ``key`` when given and present).

    Raises:
        ValueError: a scalar leaf, or leaves with different leading sizes.
    """
    if isinstance(x, dict) and key is not None and isinstance(x.get(key), torch.Tensor):
        leaves = [x[key]] + [t for t in tensor_leaves(x) if t is not x[key]]
    else:
        leaves = tensor_leaves(x)
    if not leaves or leaves[0].ndim == 0:
        raise ValueError("model inputs need the batch size as their first dimension, got a scalar (0-d) tensor")
    size = leaves[0].shape[0]
    bad = [tuple(t.shape) for t in leaves if t.ndim == 0 or t.shape[0] != size]
    if bad:
        raise ValueError(f"every tensor of a batch's inputs needs the batch size {size} first; got shapes {bad[:3]}")
    return size


def take(x: ModelInputs, start: int, stop: int) -> ModelInputs:
    """Examples ``start:stop`` of every tensor leaf (views, no copy)."""
    return tree_map(lambda t: t[start:stop] if isinstance(t, torch.Tensor) else t, x)


def select(x: ModelInputs, index: torch.Tensor) -> ModelInputs:
    """Examples at positions ``index`` (k,) of every tensor leaf (advanced indexing: copies)."""
    return tree_map(lambda t: t[index.to(t.device)] if isinstance(t, torch.Tensor) else t, x)


def concat(parts: Sequence[ModelInputs]) -> ModelInputs:
    """Inputs of several batches with the same structure, concatenated along the batch dimension.

    Raises:
        ValueError: no parts, or parts with different structures.
    """
    if not parts:
        raise ValueError("nothing to concatenate")
    flats = [tree_flatten(p) for p in parts]
    spec = flats[0][1]
    if any(s != spec for _, s in flats):
        raise ValueError("cannot concatenate inputs with different structures (keys or nesting)")
    leaves = [torch.cat(group) if isinstance(group[0], torch.Tensor) else group[0]
              for group in zip(*(f for f, _ in flats), strict=True)]
    return tree_unflatten(leaves, spec)


def place(x: ModelInputs, device: torch.device, dtype: torch.dtype) -> ModelInputs:
    """``x`` on ``device``, its floating leaves cast to ``dtype`` (integer and boolean leaves keep theirs)."""
    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    return tree_map(move, x)


def check_finite_inputs(x: ModelInputs, what: str) -> ModelInputs:
    """Raise ValueError naming ``what`` if a floating leaf of ``x`` holds NaN or Inf; returns ``x``."""
    for t in floating_leaves(x):
        check_finite(t, what)
    return x


def floating_leaves(x: ModelInputs) -> list[torch.Tensor]:
    """The floating-point tensor leaves of ``x`` (those a gradient can flow into)."""
    return [t for t in tensor_leaves(x) if t.is_floating_point()]


def input_spec(x: ModelInputs) -> InputSpec:
    """One example's shape per leaf: a tensor's ``shape[1:]``, or the same structure with per-leaf shapes.

    A single tensor gives a tuple (as ``Laplace.input_shape`` always was); containers give the container
    with ``("ndim", k)`` for each leaf: token inputs keep their rank, but their length may vary per batch
    (dynamic padding).
    """
    if isinstance(x, torch.Tensor):
        return tuple(x.shape[1:])
    return tree_map(lambda t: ("ndim", t.ndim) if isinstance(t, torch.Tensor) else None, x)


def check_like(x: ModelInputs, spec: InputSpec, what: str, fitted: bool, *, estimator: str | None = None) -> None:
    """Raise ValueError unless ``x`` matches ``spec`` (see :func:`input_spec`).

    A tensor spec: ``fitted`` asks for the same number of dimensions (prediction), or, with ``estimator`` named,
    the same example shape; otherwise the same example shape (every training batch). A container spec: same
    structure and the same rank per leaf. ``estimator`` names the fitted object in the messages.
    """
    fitted_on = f"the inputs {estimator} was fitted on" if estimator else "the training inputs"
    if isinstance(spec, tuple) and all(isinstance(s, int) for s in spec):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor of shape {batch_shape(spec)} like the training inputs, "
                            f"got {type(x).__name__}")
        if fitted and estimator is not None and tuple(x.shape[1:]) != spec:
            raise ValueError(f"{what} must have shape {batch_shape(spec)}, the shape of {fitted_on}; "
                             f"got {tuple(x.shape)}")
        if fitted and x.ndim != len(spec) + 1:
            raise ValueError(f"{what} must have shape {batch_shape(spec)} like the training "
                             f"inputs (a batch, even of one example), got {tuple(x.shape)}")
        if not fitted and tuple(x.shape[1:]) != spec:
            raise ValueError(f"inputs of shape {tuple(x.shape)}, but the first batch had inputs of shape "
                             f"{batch_shape(spec)}; every batch must have the same input shape")
        return
    if input_spec(x) != spec:
        raise ValueError(f"{what} must have the structure of {fitted_on} {describe(spec)} (the same keys or "
                         f"positions, each tensor with the same number of dimensions), got {describe(input_spec(x))}")


@contextmanager
def naming_input_shape(x: ModelInputs, spec: InputSpec | None) -> Iterator[None]:
    """Turn a failure of the model on a tensor ``x`` shaped unlike the training inputs into an error saying so."""
    try:
        yield
    except (RuntimeError, ValueError, IndexError) as err:
        if isinstance(x, torch.Tensor) and isinstance(spec, tuple) and tuple(x.shape[1:]) != spec:
            raise ValueError(f"the model fails on x of shape {tuple(x.shape)}; it was fitted on inputs of shape "
                             f"{batch_shape(spec)}") from err
        raise


def describe(spec: InputSpec) -> str:
    """A short text for an input spec, e.g. ``{input_ids: 2-d, attention_mask: 2-d}``."""
    if isinstance(spec, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in spec.items()) + "}"
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] == "ndim":
        return f"{spec[1]}-d"
    if isinstance(spec, (tuple, list)):
        return "(" + ", ".join(describe(s) for s in spec) + ")"
    return "tensor" if spec is None else str(spec)


# ----------------------------------------------------------------------------------------- calling the model
class ModelCall:
    """Calls a model on any :data:`ModelInputs` and returns its output tensor (see the module docstring).

    Args:
        model: the network.
        mapping_call: "auto" (from ``inspect.signature(model.forward)``), "kwargs" or "argument".
        output_fn: maps the model's raw output to the output tensor; default: tensor, first element of a
            tuple/list, ``"logits"`` of a mapping or ``ModelOutput``.

    Raises:
        ValueError: an unknown ``mapping_call``. TypeError: ``output_fn`` not callable.
    """

    def __init__(self, model: nn.Module, mapping_call: MappingCall | str = MappingCall.AUTO,
                 output_fn: Callable[[Any], torch.Tensor] | None = None) -> None:
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be a callable (raw model output -> tensor), got {type(output_fn).__name__}")
        self.model = model
        self.mapping_call = check_choice(mapping_call, MappingCall, "mapping_call")
        self.output_fn = output_fn
        self._signature: inspect.Signature | None = None

    def signature(self) -> inspect.Signature:
        """``inspect.signature(model.forward)`` (read once)."""
        if self._signature is None:
            self._signature = inspect.signature(self.model.forward)
        return self._signature

    def mapping_route(self, keys: Sequence[str]) -> MappingCall:
        """KWARGS or ARGUMENT for a mapping with these keys (see the module docstring). Cost: no model call.

        Raises:
            ValueError: "auto" cannot tell (a ``forward`` taking neither the keys nor one argument).
        """
        if self.mapping_call is not MappingCall.AUTO:
            return self.mapping_call
        params = list(self.signature().parameters.values())
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
        required_positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                               and p.default is p.empty]
        if keys and all(k in named for k in keys):
            return MappingCall.KWARGS
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(required_positional) == 1 or (not required_positional and len(positional) >= 1 and not var_kw):
            return MappingCall.ARGUMENT
        if var_kw and not required_positional:
            return MappingCall.KWARGS
        raise ValueError(f"cannot tell from {type(self.model).__name__}.forward{self.signature()} whether a mapping "
                         f"input with keys {sorted(keys)} goes as keyword arguments or as one argument; pass "
                         "mapping_call='kwargs' or mapping_call='argument'")

    def arguments(self, x: ModelInputs) -> tuple[tuple, dict[str, Any]]:
        """The positional and keyword arguments ``model.forward`` gets for input ``x``."""
        if isinstance(x, dict) and self.mapping_route(list(x)) is MappingCall.KWARGS:
            return (), dict(x)
        return (x,), {}

    def output(self, raw: Any) -> torch.Tensor:
        """The output tensor in the model's raw output.

        Raises:
            TypeError: an output that is none of the known kinds (pass ``output_fn=``); ValueError: a mapping
                output without ``"logits"``.
        """
        if self.output_fn is not None:
            out = self.output_fn(raw)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"output_fn returned {type(out).__name__}; it must return the output tensor")
            return out
        if isinstance(raw, torch.Tensor):
            return raw
        if isinstance(raw, Mapping):  # dicts and Hugging Face ModelOutput (an OrderedDict)
            if "logits" not in raw or not isinstance(raw["logits"], torch.Tensor):
                raise ValueError(f"the model returned a mapping with keys {list(raw)} and no 'logits' tensor; pass "
                                 "output_fn= (e.g. output_fn=lambda out: out['scores']) to say which is the output")
            return raw["logits"]
        if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], torch.Tensor):
            return raw[0]
        raise TypeError(f"the model returned {type(raw).__name__}; posthoc reads a tensor, the first element of a "
                        "tuple/list, or 'logits' of a mapping: pass output_fn= mapping the output to a tensor")

    def __call__(self, x: ModelInputs) -> torch.Tensor:
        """The output tensor of ``model`` on ``x``: one forward pass."""
        args, kwargs = self.arguments(x)
        return self.output(self.model(*args, **kwargs))

    def functional(self, params: dict[str, torch.Tensor], x: ModelInputs) -> torch.Tensor:
        """The output tensor of ``model`` on ``x`` with ``params`` (names as in ``named_parameters``) replaced.

        Differentiable in ``params`` (torch.func transforms apply). Cost: one forward pass.
        """
        args, kwargs = self.arguments(x)
        return self.output(functional_call(self.model, params, args, kwargs))
