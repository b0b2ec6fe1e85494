"""The surrogate feature network g_phi: x -> phi(x), an (m, C) matrix (docs/scalla.md).

The default surrogate is built from the trained network: its trunk (everything before the layer that maps
the penultimate features to the outputs; ``FMNISTCNN.trunk`` for the reference CNN, i.e. the conv blocks and
flatten), then FC D -> 200, ReLU, FC 200 -> m C, the output multiplied by sqrt(P / m) (the authors' scaling:
the NTK sums P parameter contributions, so O(1) raw outputs give kernel entries of the NTK's order).

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

from posthoc.utils.checks import check_choice

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
    """trunk -> Linear(D, hidden) -> ReLU -> Linear(hidden, m C), times ``scale``, reshaped to (B, m, C)."""

    def __init__(self, trunk: nn.Module, trunk_dim: int, n_features: int, n_outputs: int,
                 scale: float, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Sequential(nn.Linear(trunk_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_features * n_outputs))
        self.n_features, self.n_outputs = n_features, n_outputs
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, m, C) of inputs x (B, ...): one trunk and head pass."""
        out = self.head(self.trunk(x).flatten(1)) * self.scale
        return out.reshape(x.shape[0], self.n_features, self.n_outputs)


class FeatureMap(EvalModeModule):
    """Wraps any module returning (B, m C) or (B, m, C) into one returning (B, m, C).

    The output's shape is checked; the wrapped module stays in eval mode.
    """

    def __init__(self, module: nn.Module, n_features: int, n_outputs: int) -> None:
        super().__init__()
        self.module = module
        self.n_features, self.n_outputs = n_features, n_outputs
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, m, C) of inputs x (B, ...); ValueError if the wrapped module's output has another shape."""
        out = self.module(x)
        m, c = self.n_features, self.n_outputs
        if out.ndim == 2 and out.shape[1] == m * c:
            return out.reshape(x.shape[0], m, c)
        if out.shape[1:] == (m, c):
            return out
        raise ValueError(f"the surrogate must return (B, {m * c}) or (B, {m}, {c}) for n_features={m} and "
                         f"{c} outputs, got {tuple(out.shape)}")


def _trunk_of(model: nn.Module) -> nn.Module:
    """The part of ``model`` before its output layer, the default surrogate's trunk.

    ``model.trunk`` if it has one, else the children of an nn.Sequential before the last nn.Linear (an identity
    if the model is that Linear alone).
    """
    trunk = getattr(model, "trunk", None)
    if isinstance(trunk, nn.Module):
        return trunk
    if isinstance(model, nn.Sequential):
        children = list(model.children())
        last = max((i for i, c in enumerate(children) if isinstance(c, nn.Linear)), default=None)
        if last is None:
            raise ValueError("cannot build a default surrogate: the nn.Sequential model has no nn.Linear output "
                             "layer; pass surrogate= (an nn.Module returning (B, m*C))")
        return nn.Sequential(*children[:last]) if last > 0 else nn.Flatten()
    raise ValueError(f"cannot build a default surrogate for {type(model).__name__}: it has no .trunk and is not an "
                     "nn.Sequential; pass surrogate= (an nn.Module returning (B, m*C))")


def _reset(module: nn.Module) -> None:
    for layer in module.modules():
        if layer is not module or not list(module.children()):
            reset = getattr(layer, "reset_parameters", None)
            if callable(reset):
                reset()


def build_default_surrogate(model: nn.Module, example_input: torch.Tensor, n_features: int, n_outputs: int,
                            init: SurrogateInit | str = SurrogateInit.MODEL, seed: int = 0,
                            hidden: int = HIDDEN) -> FeatureSurrogate:
    """The default surrogate for ``model`` (see the module docstring); ``example_input`` (b, ...) sizes the trunk."""
    how = check_choice(init, SurrogateInit, "surrogate_init")
    param = next(model.parameters())
    trunk = copy.deepcopy(_trunk_of(model)).to(device=param.device, dtype=param.dtype)
    for p in trunk.parameters():
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if how is SurrogateInit.FRESH:
            _reset(trunk)
        with torch.no_grad():
            trunk_dim = trunk.eval()(example_input[:1]).flatten(1).shape[1]
        surrogate = FeatureSurrogate(trunk, trunk_dim, n_features, n_outputs,
                                     scale=math.sqrt(n_params / n_features), hidden=hidden)
    return surrogate.to(device=param.device, dtype=param.dtype)
