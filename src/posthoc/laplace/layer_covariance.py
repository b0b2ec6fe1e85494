"""A per-layer view of a fitted Laplace posterior's covariance, read live from its structure.

Moment propagation (:mod:`posthoc.streamlined`) and anything else that walks a network layer by layer needs the
posterior covariance of each module's parameters, not the flat (P,) vector the Laplace works with. This view
gives it in the structure's own form, with no P x P object for diag and KFAC:

- diagonal: a variance per entry (diag Laplace, and the diagonal fallback blocks of a KFAC Laplace such as
  LayerNorm/BatchNorm affine parameters);
- Kronecker eigenbasis (KFAC / EKFAC): Cov(vec W) = (Q_G ⊗ Q_A) diag(vec D) (Q_G ⊗ Q_A)ᵀ with
  D = 1 / (s E + δ) of shape (D_out, D_in), and a bias Cov(b) = Q_G diag(D_b) Q_Gᵀ; weight and bias are separate,
  independent blocks as in the structure;
- full: one dense covariance over the concatenation [vec W, b] of a layer, with the weight-bias
  cross-covariance; the cross-layer blocks are not in the view.

The view is computed from the Laplace's *current* prior precision and noise, so reading it again after
``optimize_prior_precision`` gives the tuned posterior.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from posthoc.laplace.laplace import Laplace
from posthoc.laplace.structures.diag import DiagCurvature
from posthoc.laplace.structures.full import FullCurvature
from posthoc.laplace.structures.kron import KronCurvature
from posthoc.network.subset import SubsetOfWeights

# Largest P for which a full Laplace's dense covariance (P x P) is formed by the view.
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
        """Q_G diag(inv) Q_Gᵀ (D_out, D_out), for a bias factor."""
        return (self.q_out * self.inv) @ self.q_out.T


@dataclass
class LayerCovariance:
    """The posterior covariance of one module's parameters; attributes absent from every field are deterministic.

    ``diag``: attr -> variance (same shape as the parameter); ``kron``: attr -> :class:`KronFactor`;
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
        """Split a full covariance over (weight, bias) of a Linear/Conv2d into its blocks.

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


def layer_covariances(la: Laplace, max_full_params: int = MAX_FULL_PARAMS) -> dict[str, LayerCovariance]:
    """The posterior covariance of every covered module of a fitted Laplace, at its current prior and noise.

    Keys are module names relative to ``la.subset.module`` (the model for all-weights and subnetwork Laplace,
    the last layer's module for last-layer Laplace). Cost: diag, the posterior variance (P,); KFAC, one
    eigenvalue shift per block (no P-sized object beyond the fallback entries); full, one P x P inverse.

    Raises:
        RuntimeError: the Laplace is not fitted.
        ValueError: a structure without a per-layer form (low rank, functional), a full Laplace over more than
            ``max_full_params`` parameters, or a subnetwork subset with kron/full.
    """
    curvature = la.structure
    if curvature is None:
        raise RuntimeError("call fit(train_loader) first: the Laplace approximation is not fitted")
    subset = la.subset
    prior, scale = la.prior_precision, la.factors.scale(la.sigma_noise)
    layers: dict[str, LayerCovariance] = {}

    def layer(block) -> LayerCovariance:
        return layers.setdefault(block.layer_name, LayerCovariance())

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
        return layers
    if subset.kind is SubsetOfWeights.SUBNETWORK:
        raise ValueError("a per-layer covariance of a subnetwork Laplace exists for hessian_structure='diag' only")
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
        return layers
    if isinstance(curvature, FullCurvature):
        if subset.n_params > max_full_params:
            raise ValueError(f"a full Laplace over {subset.n_params} parameters needs a dense P x P covariance; "
                             f"the per-layer view forms it only for P <= {max_full_params}: use "
                             "subset_of_weights='last_layer' or a diag/kron structure")
        precision = curvature.dense_precision(prior, scale).detach()
        cov = torch.linalg.inv(precision)
        cov = 0.5 * (cov + cov.T)
        by_layer: dict[str, list] = {}
        for block in subset.blocks:
            by_layer.setdefault(block.layer_name, []).append(block)
        for layer_name, blocks in by_layer.items():
            rows = torch.cat([torch.arange(b.offset, b.offset + b.numel, device=cov.device) for b in blocks])
            layers[layer_name] = LayerCovariance(full=([b.kind for b in blocks], cov[rows][:, rows]))
        return layers
    raise ValueError(f"a per-layer covariance exists for Laplace structures diag, kron, ekfac and full; got "
                     f"{type(curvature).__name__} ({la.structure_name!r})")
