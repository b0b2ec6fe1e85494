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

The means are the module's own parameters (the MAP for a Laplace posterior). These
functions only read the Laplace object (its subset, prior, scale and curvature); the
Kronecker eigenvalues are read from the curvature's ``_precision_eigenvalues`` (the same
``s E + δ`` every Laplace prediction uses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, cast

import torch
from torch import nn

from posthoc.laplace import Laplace, SubsetOfWeights
from posthoc.laplace.structures.diag import DiagCurvature
from posthoc.laplace.structures.full import FullCurvature
from posthoc.laplace.structures.kron import KronCurvature
from posthoc.utils.checks import check_finite

# Largest P for which a full Laplace's dense covariance (P x P) is formed.
MAX_FULL_PARAMS = 20_000


@dataclass
class KronFactor:
    """Cov of one parameter tensor in the Kronecker eigenbasis.

    Weight: ``q_out`` (D_out, D_out), ``q_in`` (D_in, D_in), ``inv`` (D_out, D_in) = 1/(s E + δ).
    Bias: ``q_in`` None and ``inv`` (D_out,).
    """

    q_out: torch.Tensor
    q_in: torch.Tensor | None
    inv: torch.Tensor

    def dense_bias_cov(self) -> torch.Tensor:
        """Q_G diag(inv) Q_G^T (D_out, D_out), for a bias factor."""
        return (self.q_out * self.inv) @ self.q_out.T


@dataclass
class LayerPosterior:
    """The posterior of one module's parameters; attributes absent from every field are deterministic.

    ``diag``: attr -> variance (same shape as the parameter); ``kron``: attr -> KronFactor;
    ``full``: (attrs in order, dense covariance over their concatenated flattened entries).
    """

    diag: dict[str, torch.Tensor] = field(default_factory=dict)
    kron: dict[str, KronFactor] = field(default_factory=dict)
    full: tuple[list[str], torch.Tensor] | None = None

    def is_random(self, attr: str) -> bool:
        """Whether the parameter ``attr`` (e.g. "weight") has a posterior variance in any of the three forms."""
        return attr in self.diag or attr in self.kron or (self.full is not None and attr in self.full[0])

    @property
    def is_empty(self) -> bool:
        """Whether no parameter of the layer is random."""
        return not self.diag and not self.kron and self.full is None

    def full_blocks(self, module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Split a full posterior over (weight, bias) of a Linear/Conv2d into its blocks.

        Returns Cov(W) (C, K, C, K), Cov(W, b) (C, K, C) and Cov(b) (C, C), with K = the flattened input width; None
        where absent.
        """
        assert self.full is not None
        attrs, cov = self.full
        sizes = [getattr(module, a).numel() for a in attrs]
        parts = dict(zip(attrs, torch.split(torch.arange(cov.shape[0], device=cov.device), sizes), strict=True))
        weight = cast(torch.Tensor, module.weight)
        c_out, k = weight.shape[0], weight[0].numel()
        w_idx, b_idx = parts.get("weight"), parts.get("bias")
        cww = None if w_idx is None else cov[w_idx][:, w_idx].reshape(c_out, k, c_out, k)
        cwb = None if w_idx is None or b_idx is None else cov[w_idx][:, b_idx].reshape(c_out, k, c_out)
        cbb = None if b_idx is None else cov[b_idx][:, b_idx]
        return cww, cwb, cbb


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
    """Per-layer posteriors of a fitted diag / kron / ekfac / full :class:`~posthoc.laplace.Laplace`.

    Raises ValueError for other structures, a Laplace on another model, a full Laplace
    with more than MAX_FULL_PARAMS parameters, and ``subnetwork`` subsets with kron/full.
    """
    curvature = la._require_fit()
    subset = la.subset
    prefix = _module_name(model, subset.module)
    prior, scale = la.prior_precision, la.factors.scale(la.sigma_noise)
    layers: dict[str, LayerPosterior] = {}

    def layer(block) -> LayerPosterior:
        return layers.setdefault(_join(prefix, block.layer_name), LayerPosterior())

    if isinstance(curvature, DiagCurvature):
        variance = curvature.posterior_variance(prior, scale).detach()
        for block, positions in subset.block_slices_in_theta():
            if positions.numel() == 0:
                continue
            full = torch.zeros(block.numel, dtype=variance.dtype, device=variance.device)
            if subset.indices is None:
                full = variance[positions]
            else:  # a subnetwork: the uncovered entries of the tensor stay deterministic
                full[subset.indices[positions] - block.offset] = variance[positions]
            layer(block).diag[block.kind] = full.reshape(block.shape)
        return WeightPosterior(model, layers, f"diagonal Laplace ({subset.kind.value})")
    if subset.kind is SubsetOfWeights.SUBNETWORK:
        raise ValueError("Streamlined supports subset_of_weights='subnetwork' with hessian_structure='diag' only")
    if isinstance(curvature, KronCurvature):  # also EKFAC: same eigenbasis, corrected eigenvalues
        kron, _ = curvature._precision_eigenvalues(prior, scale)
        marginal = curvature.posterior_variance(prior, scale).detach()
        covered = {blk.index: blk for blk in curvature.blocks}
        for index, block in enumerate(subset.blocks):
            if index in covered:
                blk = covered[index]
                layer(block).kron[block.kind] = KronFactor(blk.q_out.detach(),
                                                           None if blk.q_in is None else blk.q_in.detach(),
                                                           (1.0 / kron[index]).detach())
            else:
                layer(block).diag[block.kind] = marginal[block.slice].reshape(block.shape)
        return WeightPosterior(model, layers, f"KFAC Laplace ({subset.kind.value})")
    if isinstance(curvature, FullCurvature):
        if subset.n_params > MAX_FULL_PARAMS:
            raise ValueError(f"a full Laplace over {subset.n_params} parameters needs a dense P x P covariance; "
                             f"Streamlined forms it only for P <= {MAX_FULL_PARAMS}: use "
                             "subset_of_weights='last_layer' or a diag/kron structure")
        precision = curvature.dense_precision(prior, scale).detach()
        cov = torch.linalg.inv(precision)
        cov = 0.5 * (cov + cov.T)
        by_layer: dict[str, list] = {}
        for block in subset.blocks:
            by_layer.setdefault(block.layer_name, []).append(block)
        for layer_name, blocks in by_layer.items():
            rows = torch.cat([torch.arange(b.offset, b.offset + b.numel, device=cov.device) for b in blocks])
            layers[_join(prefix, layer_name)] = LayerPosterior(full=([b.kind for b in blocks], cov[rows][:, rows]))
        return WeightPosterior(model, layers, f"full Laplace ({subset.kind.value}), layer blocks")
    raise ValueError(f"Streamlined supports Laplace structures diag, kron, ekfac and full; got "
                     f"{type(curvature).__name__} ({la.structure_name!r})")


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
