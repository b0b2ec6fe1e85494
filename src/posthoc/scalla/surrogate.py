"""The surrogate feature network g_phi: x -> phi(x), an (m, C) matrix (docs/scalla.md).

The default surrogate is built from the trained network: its trunk (everything before the layer that maps
the penultimate features to the outputs; ``FMNISTCNN.trunk`` for the reference CNN, i.e. the conv blocks and
flatten), then FC D -> 200, ReLU, FC 200 -> m C, the output multiplied by sqrt(P / m) (the authors' scaling:
the NTK sums P parameter contributions, so O(1) raw outputs give kernel entries of the NTK's order).

Any other model (no ``.trunk``, not an nn.Sequential: a Hugging Face classifier, a model taking token ids
and attention masks or returning a dict) gets :class:`ModelTrunk`: a deep copy of the whole model whose last
nn.Linear on the path to the output (found as for the last-layer Laplace,
:func:`posthoc.network.last_layer.last_linear_on_path`, on the first training batch) is replaced by an
identity. It is called like the model (:class:`posthoc.network.inputs.ModelCall`: mapping inputs as keyword
arguments or one argument, the "logits" of a dict output, ``output_fn``), so its output is what the model's
head reads, carried through whatever parameter-free steps follow the head (GPT-2 pools the last non-pad
token: the trunk gives that token's hidden state; BERT: the pooled [CLS] state), flattened to (B, D).
A head tied to an input embedding (a language-model head) is replaced in the copy only (the embedding keeps
its weights). In a peft model the last nn.Linear is an adapter's ``lora_B``; the whole adapted layer (the module
with a ``base_layer``) is replaced.

Outputs with positions (B, ..., C), a per-token or per-pixel head (posthoc.scalla.positions): the trunk keeps
the positions, (B, ..., D) (for a language model the hidden state of every token), and the two FC layers act at
each position, so phi(x, t) (m, C) is a feature matrix per position. A trunk that pools the positions away is
refused (pass ``surrogate=``).

The trunk is a deep copy (the network itself never changes). ``init="model"`` keeps the trained trunk
weights as the starting point; ``init="fresh"`` re-draws every trunk layer with PyTorch's default
initialisation (``reset_parameters``) from a generator seeded by ``seed``. The two new FC layers always get
the default initialisation from the same seed.

A surrogate is a deterministic feature map: it is trained and evaluated in eval mode (``train()`` leaves
every layer in eval mode). A trunk copied from a network with Dropout would otherwise draw its masks from the
global RNG while training, so the same ``seed`` gave a different kernel (4.8% apart on a small MLP), fitted
features of thinned networks that prediction never uses, different masks on different ranks and a resumed run
that differs from an uninterrupted one; BatchNorm would normalise by each step's batch (each rank's part of it)
and overwrite the running statistics copied from the network.
"""

from __future__ import annotations

import copy
import math
from enum import Enum

import torch
from torch import nn

from posthoc.network.inputs import ModelCall, ModelInputs, batch_size, take
from posthoc.network.last_layer import last_linear_on_path
from posthoc.utils.checks import check_choice
from posthoc.utils.modes import eval_mode

HIDDEN = 200


class SurrogateInit(str, Enum):
    """How the default surrogate's trunk starts: at the trained network's weights or re-drawn (seeded)."""
    MODEL = "model"  # the trunk starts at the trained network's weights
    FRESH = "fresh"  # the trunk is re-initialised (seeded)


class EvalModeModule(nn.Module):
    """A module that stays in eval mode: ``train()`` is ``eval()`` (see the module docstring)."""

    def train(self, mode: bool = True) -> "EvalModeModule":
        """Stay in eval mode whatever ``mode`` (the surrogate is a deterministic feature map); returns self."""
        return super().train(False)


class FeatureSurrogate(EvalModeModule):
    """trunk -> Linear(D, hidden) -> ReLU -> Linear(hidden, m C), times ``scale``, reshaped to (B, m, C).

    With ``position_dims`` > 0 (outputs (B, ..., C)) the trunk keeps the positions, (B, ..., D), and the head
    acts at each position: features (B, ..., m, C), one (m, C) matrix per position.
    """

    def __init__(self, trunk: nn.Module, trunk_dim: int, n_features: int, n_outputs: int,
                 scale: float, hidden: int = HIDDEN, position_dims: int = 0) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Sequential(nn.Linear(trunk_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_features * n_outputs))
        self.n_features, self.n_outputs, self.position_dims = n_features, n_outputs, position_dims
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.eval()

    def forward(self, x: ModelInputs) -> torch.Tensor:
        """Features (B, m, C) (positions: (B, ..., m, C)) of inputs x (B, ...; or a tuple/mapping). One trunk and head pass.

        Raises:
            ValueError: with positions, a trunk output that is not (B, ..., D) with ``position_dims`` positions.
        """
        hidden = self.trunk(x)
        if not self.position_dims:
            out = self.head(hidden.flatten(1)) * self.scale
            return out.reshape(out.shape[0], self.n_features, self.n_outputs)
        if hidden.ndim != 2 + self.position_dims:
            raise ValueError(f"the surrogate's trunk returned {tuple(hidden.shape)}, not (B, ..., D) with "
                             f"{self.position_dims} position dimension(s) as the model's outputs")
        out = self.head(hidden) * self.scale
        return out.reshape(*out.shape[:-1], self.n_features, self.n_outputs)


class FeatureMap(EvalModeModule):
    """Wraps any module returning (B, m C) or (B, m, C) into one returning (B, m, C).

    With ``position_dims`` > 0 (outputs (B, ..., C)): (B, ..., m C) or (B, ..., m, C) into (B, ..., m, C), the
    features of each position. The output's shape is checked; the wrapped module stays in eval mode.
    """

    def __init__(self, module: nn.Module, n_features: int, n_outputs: int, position_dims: int = 0) -> None:
        super().__init__()
        self.module = module
        self.n_features, self.n_outputs, self.position_dims = n_features, n_outputs, position_dims
        self.eval()

    def forward(self, x: ModelInputs) -> torch.Tensor:
        """Features (B, m, C) (positions: (B, ..., m, C)) of inputs x; ValueError for an output of another shape."""
        out = self.module(x)
        m, c, dims = self.n_features, self.n_outputs, self.position_dims
        if out.ndim == 2 + dims and out.shape[-1] == m * c:
            return out.reshape(*out.shape[:-1], m, c)
        if out.ndim == 3 + dims and out.shape[-2:] == (m, c):
            return out
        where = "(B, ..." if dims else "(B"
        raise ValueError(f"the surrogate must return {where}, {m * c}) or {where}, {m}, {c}) for n_features={m} and "
                         f"{c} outputs{f' at {dims} position dimension(s)' if dims else ''}, got {tuple(out.shape)}")


class ModelTrunk(nn.Module):
    """A copy of a model with its last nn.Linear replaced by an identity, called like the model (module docstring).

    Args:
        model: the copy (changed in place: the layer ``head_name`` becomes ``nn.Identity()``).
        head_name: the name of the replaced nn.Linear in ``model.named_modules()``.
        call: how the original model is called (its ``mapping_call`` and ``output_fn`` are kept).
    """

    def __init__(self, model: nn.Module, head_name: str, call: ModelCall | None = None) -> None:
        super().__init__()
        parent_name, _, attr = head_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.Identity())
        self.model, self.head_name = model, head_name
        self._call = ModelCall(model, *((call.mapping_call, call.output_fn) if call is not None else ()))

    def forward(self, x: ModelInputs) -> torch.Tensor:
        """What the model's last nn.Linear read, after the model's parameter-free steps: (B, ...). One forward pass."""
        return self._call(x)


def _trunk_of(model: nn.Module, example_input: ModelInputs, call: ModelCall | None) -> nn.Module:
    """The part of ``model`` before its output layer, the default surrogate's trunk, as a new module (a deep copy).

    ``model.trunk`` if it has one; else the children of an nn.Sequential before the last nn.Linear (an identity
    if the model is that Linear alone); else a :class:`ModelTrunk` (the module docstring). Cost: for the
    :class:`ModelTrunk`, one forward and one backward pass on ``example_input`` to find the last layer.

    Raises:
        ValueError: an nn.Sequential without nn.Linear, or a model whose output no nn.Linear feeds.
    """
    trunk = getattr(model, "trunk", None)
    if isinstance(trunk, nn.Module):
        return copy.deepcopy(trunk)
    if isinstance(model, nn.Sequential):
        children = list(model.children())
        last = max((i for i, c in enumerate(children) if isinstance(c, nn.Linear)), default=None)
        if last is None:
            raise ValueError("cannot build a default surrogate: the nn.Sequential model has no nn.Linear output "
                             "layer; pass surrogate= (an nn.Module returning (B, m*C))")
        return copy.deepcopy(nn.Sequential(*children[:last])) if last > 0 else nn.Flatten()
    call = ModelCall(model) if call is None else call
    try:
        with eval_mode(model), torch.enable_grad():
            head = last_linear_on_path(model, take(example_input, 0, min(2, batch_size(example_input))), call)
    except ValueError as err:
        raise ValueError(f"cannot build a default surrogate for {type(model).__name__}: no nn.Linear feeds its "
                         "output (the default replaces the last one); pass surrogate= (an nn.Module returning "
                         "(B, m*C))") from err
    return ModelTrunk(copy.deepcopy(model), _adapter_wrapper(model, head), call)


def _adapter_wrapper(model: nn.Module, name: str) -> str:
    """``name``, or the outermost module around it with a ``base_layer`` (a peft LoRA/adapter layer wrapping a Linear).

    The last nn.Linear on the path of a peft model is an adapter's ``lora_B``; the head to replace is the adapted
    layer as a whole (its base Linear plus the adapter).
    """
    parts = name.split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth])
        if isinstance(getattr(model.get_submodule(prefix), "base_layer", None), nn.Module):
            return prefix
    return name


def _reset(module: nn.Module) -> None:
    for layer in module.modules():
        if layer is not module or not list(module.children()):
            reset = getattr(layer, "reset_parameters", None)
            if callable(reset):
                reset()


def build_default_surrogate(model: nn.Module, example_input: ModelInputs, n_features: int, n_outputs: int,
                            init: SurrogateInit | str = SurrogateInit.MODEL, seed: int = 0,
                            hidden: int = HIDDEN, call: ModelCall | None = None,
                            position_dims: int = 0) -> FeatureSurrogate:
    """The default surrogate for ``model`` (see the module docstring).

    Args:
        model: the trained network (not changed: the trunk is a copy).
        example_input: a batch of model inputs (b, ...; a tensor, tuple or mapping); sizes the trunk and, for a
            model without ``.trunk`` that is no nn.Sequential, locates its last nn.Linear.
        n_features: m, the latent features.
        n_outputs: C, the model's outputs.
        init: "model" (the trunk at the trained weights) or "fresh" (re-drawn, seeded by ``seed``).
        seed: seeds the re-drawn trunk and the head's initialisation.
        hidden: the head's hidden width.
        call: how the model takes its inputs and gives its output (default ``ModelCall(model)``).
        position_dims: the position dimensions of the model's outputs (B, ..., C) (0 for outputs (B, C)). The trunk
            must keep the outputs' positions, (B, ..., D): the head then acts per position.

    Returns:
        A :class:`FeatureSurrogate` mapping inputs (B, ...) to (B, m, C) (positions: (B, ..., m, C)). Cost: a deep
        copy of the trunk (for a :class:`ModelTrunk`, of the whole model) and a few forward passes on one or two
        examples (with positions, one more of the model).

    Raises:
        ValueError: no nn.Linear to replace; with positions, a trunk whose output does not keep them.
    """
    how = check_choice(init, SurrogateInit, "surrogate_init")
    call = ModelCall(model) if call is None else call
    positions: tuple[int, ...] = ()
    if position_dims:
        with torch.no_grad(), eval_mode(model):
            positions = tuple(call(take(example_input, 0, 1)).shape[1:-1])
    param = next(model.parameters())
    trunk = _trunk_of(model, example_input, call).to(device=param.device, dtype=param.dtype)
    for p in trunk.parameters():
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if how is SurrogateInit.FRESH:
            _reset(trunk)
        with torch.no_grad():
            hidden_out = trunk.eval()(take(example_input, 0, 1))
        if positions and tuple(hidden_out.shape[1:-1]) != tuple(positions):
            raise ValueError(f"the model's outputs have positions {tuple(positions)}, but its part before the last "
                             f"nn.Linear (the default surrogate's trunk) returns {tuple(hidden_out.shape)}, not "
                             "(B, ..., D) at those positions, so the surrogate's head cannot act per position; pass "
                             "surrogate= (an nn.Module returning per-position features (B, ..., m*C))")
        trunk_dim = hidden_out.shape[-1] if positions else hidden_out.flatten(1).shape[1]
        surrogate = FeatureSurrogate(trunk, trunk_dim, n_features, n_outputs,
                                     scale=math.sqrt(n_params / n_features), hidden=hidden,
                                     position_dims=position_dims)
    return surrogate.to(device=param.device, dtype=param.dtype)
