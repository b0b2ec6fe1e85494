"""The Gaussian state carried through the network, and the linear-map algebra on it.

A state describes the activations of one layer for a batch of B inputs:

- ``mean`` (B, *shape);
- diagonal mode: ``var`` (B, *shape), units treated as independent;
- full mode: ``cov`` (B, D, D), D = prod(shape), over the row-major flattening of ``shape``;
- ``var``/``cov`` None means "no variance yet" (a deterministic input before the first
  random layer), which the rules use to skip work;
- full mode only: ``crosses``, cross-covariances (B, D, D_anchor) of the current
  activations with earlier ones (the input of each open residual block), so a residual
  join keeps the branch/skip covariance (see :mod:`posthoc.streamlined.joint`);
- the network's output only: ``factor`` F (B, C, R) with ``var`` d, the covariance
  F Fᵀ + diag(d) kept factored (the diagonal mode's last Linear when R < C; see
  :meth:`posthoc.streamlined.rules.affine.LinearStep.factored_output`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch

# A linear map on batches of directions: (B, N, *in_shape) -> (B, N, *out_shape).
DirectionMap = Callable[[torch.Tensor], torch.Tensor]


class ActivationCovariance(str, Enum):
    """How the activation covariance is carried (see :class:`posthoc.streamlined.Streamlined`)."""

    DIAGONAL = "diagonal"  # units independent: O(D) per layer (the authors' rule)
    FULL = "full"  # per-example D x D covariance: O(D^2) memory, O(D^2 * layer cost) time


@dataclass
class Moments:
    """Mean and (diagonal or full) covariance of one layer's activations; see the module docstring."""

    mean: torch.Tensor
    var: torch.Tensor | None = None
    cov: torch.Tensor | None = None
    crosses: list[torch.Tensor] = field(default_factory=list)
    factor: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Feature shape (without the batch dimension)."""
        return tuple(self.mean.shape[1:])

    @property
    def dim(self) -> int:
        """D, the number of features per example (the product of ``shape``)."""
        return int(self.mean[0].numel())

    @property
    def is_full(self) -> bool:
        """Whether the state carries a full covariance (B, D, D) rather than variances."""
        return self.cov is not None

    def flat_var(self) -> torch.Tensor | None:
        """Marginal variances (B, D), or None when there is no variance."""
        if self.cov is not None:
            return torch.diagonal(self.cov, dim1=-2, dim2=-1)
        return None if self.var is None else self.var.reshape(self.var.shape[0], -1)


def add_optional(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """A + b where None is zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def apply_rows(fn: DirectionMap, matrix: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """Apply a linear map to the last axis of (B, N, D_in): returns (B, N, D_out)."""
    batch, n = matrix.shape[:2]
    out = fn(matrix.reshape(batch, n, *in_shape))
    return out.reshape(batch, n, -1)


def sandwich(fn: DirectionMap, cov: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """J Sigma J^T for the linear map J given by ``fn``: (B, D_in, D_in) -> (B, D_out, D_out).

    Cost: the map applied to D_in + D_out directions per example. The result is symmetrised.
    """
    left = apply_rows(fn, cov, in_shape)  # (B, D_in, D_out) = Sigma J^T
    out = apply_rows(fn, left.transpose(1, 2), in_shape)  # (B, D_out, D_out) = J Sigma J^T
    return 0.5 * (out + out.transpose(1, 2))


def apply_to_crosses(fn: DirectionMap, crosses: list[torch.Tensor], in_shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Cross-covariances (B, D_in, D_a) -> (B, D_out, D_a): J applied on the left."""
    return [apply_rows(fn, c.transpose(1, 2), in_shape).transpose(1, 2) for c in crosses]


def rearrange(state: Moments, fn: Callable[[torch.Tensor], torch.Tensor]) -> Moments:
    """Apply a pure re-indexing ``fn`` (reshape / transpose / flatten on (B, *shape)) to a state.

    Means and variances are re-indexed directly; a full covariance is permuted by the
    index map ``fn`` induces on the flattened features.
    """
    mean = fn(state.mean)
    if state.cov is None and not state.crosses:
        return Moments(mean, var=None if state.var is None else fn(state.var))
    index = fn(torch.arange(state.dim, device=state.mean.device).reshape(1, *state.shape)).reshape(-1)
    cov = None if state.cov is None else state.cov[:, index][:, :, index]
    return Moments(mean, cov=cov, crosses=[c[:, index] for c in state.crosses])


def joined(outputs: list[Moments]) -> Moments:
    """The network outputs of several input chunks as one batch: means (B, C) and their covariances joined.

    Every chunk carries the same form (full, diagonal, or factored with the same rank), as one walk gives; a
    chunk without variance counts as zero variance. Cost: one copy of each chunk (none for a single chunk).
    """
    if len(outputs) == 1:
        return outputs[0]
    mean = torch.cat([out.mean for out in outputs])
    if all(out.cov is not None for out in outputs):
        return Moments(mean, cov=torch.cat([out.cov for out in outputs if out.cov is not None]))
    var = torch.cat([out.var if out.var is not None else torch.zeros_like(out.mean) for out in outputs])
    factors = [out.factor for out in outputs if out.factor is not None]
    if not factors:
        return Moments(mean, var=var)
    if len(factors) != len(outputs) or len({f.shape[-1] for f in factors}) != 1:
        raise RuntimeError("the chunks' output covariances differ in form; propagate the inputs as one batch")
    return Moments(mean, var=var, factor=torch.cat(factors))
