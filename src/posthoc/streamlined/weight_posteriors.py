"""Per-layer views of a Gaussian weight posterior, as moment propagation needs them.

Weights of different layers are treated as independent (the streamlined method's
assumption); within a layer each parameter tensor has one of three forms:

- diagonal: a variance per entry (diagonal Laplace, a mean-field posterior, and the
  diagonal fallback blocks of a KFAC Laplace, e.g. LayerNorm/BatchNorm affine parameters);
- Kronecker eigenbasis (KFAC / EKFAC Laplace): Cov(vec W) = (Q_G ⊗ Q_A) diag(vec D) (Q_G ⊗ Q_A)^T
  with D = 1 / (s E + δ) (D_out, D_in), and a bias Cov(b) = Q_G diag(D_b) Q_G^T; weight and
  bias are separate blocks (independent), as in :mod:`posthoc.laplace.structures.kron`;
- full: one dense covariance over the concatenation [vec W, b] of a layer (full Laplace),
  including weight-bias cross-covariances. Cross-layer covariances of a full Laplace are
  dropped, so the propagated moments are those of its layer-block-diagonal part.

The means are the module's own parameters (the MAP for a Laplace posterior). A Laplace posterior is
read through its public per-layer view (:mod:`posthoc.laplace.layer_covariance`: the same ``s E + δ``
every Laplace prediction uses), at the prior precision and noise it has when read.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from posthoc.laplace import Laplace
from posthoc.laplace.layer_covariance import MAX_FULL_PARAMS, KronFactor, LayerCovariance, layer_covariances
from posthoc.laplace.structures.diag import DiagCurvature
from posthoc.laplace.structures.full import FullCurvature
from posthoc.laplace.structures.kron import KronCurvature
from posthoc.utils.checks import check_finite

# One layer's posterior as propagation reads it: the Laplace's per-layer covariance view, or a mean-field one.
LayerPosterior = LayerCovariance
__all__ = ["KronFactor", "LayerPosterior", "MAX_FULL_PARAMS", "WeightPosterior", "from_laplace", "from_mean_field",
           "load_means"]


class WeightPosterior:
    """Module name -> :class:`LayerPosterior`, looked up by module identity while walking a model."""

    def __init__(self, model: nn.Module, layers: dict[str, LayerPosterior], description: str) -> None:
        modules = dict(model.named_modules())
        unknown = sorted(set(layers) - set(modules))
        if unknown:
            raise ValueError(f"posterior names modules the model does not have: {unknown}")
        _refuse_shared_parameters(model, {name for name, post in layers.items() if not post.is_empty})
        self._by_id = {id(modules[name]): post for name, post in layers.items() if not post.is_empty}
        self.layers = layers
        self.description = description

    def get(self, module: nn.Module) -> LayerPosterior | None:
        """The module's posterior, or None when all its parameters are deterministic."""
        return self._by_id.get(id(module))

    def deterministic(self) -> "WeightPosterior":
        """The same model with every weight at its mean (for input-noise-only propagation)."""
        empty = WeightPosterior.__new__(WeightPosterior)
        empty._by_id, empty.layers, empty.description = {}, {}, "deterministic weights"
        return empty


def _refuse_shared_parameters(model: nn.Module, random_layers: set[str]) -> None:
    """Raise ValueError if a parameter of a layer with a posterior is also held by another module (tied weights).

    Propagation treats each layer's weights as its own and independent of every other layer's; a Parameter
    held by two modules would be random in one and (its posterior keyed to the first holder) fixed or
    independent in the other, so the variances would be wrong without a word.
    """
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append(_join(name, attr))
    for names in holders.values():
        if len(names) > 1 and any(n.rpartition(".")[0] in random_layers for n in names):
            raise ValueError(f"the parameters {names} are one tensor held by several modules (tied weights); "
                             "Streamlined propagates each layer's weights as its own and cannot carry their "
                             "correlation: use the Laplace's linearised predictive (la.predict(x)) for this model")


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("the Laplace object's covered module is not part of the model given to Streamlined")


def _join(prefix: str, name: str) -> str:
    return ".".join(p for p in (prefix, name) if p)


def from_laplace(model: nn.Module, la: Laplace) -> WeightPosterior:
    """Per-layer posteriors of a fitted diag / kron / ekfac / full Laplace, at its current prior and noise.

    Read through :func:`posthoc.laplace.layer_covariance.layer_covariances`, keyed by module names of ``model``.

    Raises ValueError for other structures, a Laplace on another model, a full Laplace
    with more than MAX_FULL_PARAMS parameters, and ``subnetwork`` subsets with kron/full.
    """
    prefix = _module_name(model, la.subset.module)
    layers = {_join(prefix, name): post for name, post in layer_covariances(la, MAX_FULL_PARAMS).items()}
    structure = {DiagCurvature: "diagonal", KronCurvature: "KFAC", FullCurvature: "full"}
    kind = next((name for cls, name in structure.items() if isinstance(la.structure, cls)), la.structure_name)
    suffix = ", layer blocks" if isinstance(la.structure, FullCurvature) else ""
    return WeightPosterior(model, layers, f"{kind} Laplace ({la.subset.kind.value}){suffix}")


def _as_named(model: nn.Module, value: Mapping[str, torch.Tensor] | torch.Tensor, what: str
              ) -> dict[str, torch.Tensor]:
    """A dict of parameter name -> tensor from a dict or a flat (P,) vector in parameters_to_vector order."""
    params = dict(model.named_parameters())
    if isinstance(value, torch.Tensor):
        total = sum(p.numel() for p in params.values())
        if value.ndim != 1 or value.numel() != total:
            raise ValueError(f"{what} as a vector must have shape ({total},) (parameters_to_vector order), "
                             f"got {tuple(value.shape)}")
        out, offset = {}, 0
        for name, p in params.items():
            out[name] = value[offset:offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        return out
    unknown = sorted(set(value) - set(params))
    if unknown:
        raise ValueError(f"{what} names parameters the model does not have: {unknown}; "
                         f"its parameters: {list(params)}")
    for name, t in value.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(f"{what}[{name!r}] has shape {tuple(t.shape)}, the parameter {tuple(params[name].shape)}")
    return dict(value)


def load_means(model: nn.Module, weight_mean: Mapping[str, torch.Tensor] | torch.Tensor) -> None:
    """Copy posterior means into the model's parameters (in place; pass a copy of the user's model)."""
    means = _as_named(model, weight_mean, "weight_mean")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in means.items():
            check_finite(t, f"weight_mean[{name!r}]")
            params[name].copy_(t)


def from_mean_field(model: nn.Module, weight_var: Mapping[str, torch.Tensor] | torch.Tensor) -> WeightPosterior:
    """A mean-field posterior: independent variances per parameter (dict by name, or a (P,) vector).

    Parameters without a variance (absent from the dict) are deterministic.
    """
    variances = _as_named(model, weight_var, "weight_var")
    params = dict(model.named_parameters())
    layers: dict[str, LayerPosterior] = {}
    for name, var in variances.items():
        check_finite(var, f"weight_var[{name!r}]")
        if bool((var < 0).any()):
            raise ValueError(f"weight_var[{name!r}] has negative entries")
        layer_name, _, attr = name.rpartition(".")
        layers.setdefault(layer_name, LayerPosterior()).diag[attr] = var.detach().to(params[name])
    return WeightPosterior(model, layers, "mean-field (diagonal) posterior")
