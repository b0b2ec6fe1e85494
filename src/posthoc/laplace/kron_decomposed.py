"""laplace-torch's ``KronDecomposed`` surface on posthoc's Kronecker-factored posterior precision.

laplace-torch's KFAC Laplace returns its posterior precision as a ``KronDecomposed``: per parameter tensor the
eigenbases of the Kronecker factors, their eigenvalues and an additive delta. :class:`KronDecomposed` gives ported
code the same public behaviour (``eigenvectors``, ``eigenvalues``, ``deltas``, ``logdet()``, ``bmm(W, exponent)``,
``inv_square_form(W)``, ``diag(exponent)``, ``to_matrix(exponent)``, ``+ deltas``, ``* scalar``, ``len``,
``detach()``) on posthoc's own fitted structure (:class:`posthoc.laplace.structures.kron.KronCurvature`, and its
EKFAC subclass), without copying it: per parameter tensor (in the order of the flat theta),

    Lambda_l = Q_l diag(c E_l + delta_l) Q_l^T,

with Q_l = Q_rows ⊗ Q_cols for a weight laid out (rows, cols) as it is stored (Q_G ⊗ Q_A; Q_A ⊗ Q_G for a
transposed Conv1D weight), Q_G for a bias, the identity for a parameter outside Kronecker layers (posthoc's exact
diagonal fallback, which laplace-torch's "kron" does not have), E_l the curvature eigenvalues, c the curvature
factor (laplace-torch's ``_H_factor`` 1 / (sigma^2 T)) and delta_l the prior precision of the tensor. Everything is
differentiable in the deltas (and in c). Costs are for weights of shape (rows, cols); nothing forms a P x P matrix
except :meth:`KronDecomposed.to_matrix`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch

from posthoc.laplace.prior import per_block
from posthoc.laplace.structures.ekfac import EKFACCurvature
from posthoc.laplace.structures.kron import KronCurvature


@dataclass(frozen=True)
class _Block:
    """One parameter tensor's eigenstructure: ``rows``/``cols`` bases (None: identity), eigenvalues E at c = 1.

    ``values`` is (rows, cols) for a weight (``cols`` set), (n,) for a bias or a diagonal block.
    """

    rows: torch.Tensor | None
    cols: torch.Tensor | None
    values: torch.Tensor

    @property
    def numel(self) -> int:
        return self.values.numel()


def _blocks(curvature: KronCurvature) -> list[_Block]:
    """The fitted structure's blocks in theta order, weights in their storage layout."""
    by_index = {blk.index: blk for blk in curvature.blocks}
    fallback = curvature._split_fallback(curvature.fallback_diag)
    out = []
    for index in range(len(curvature.subset.blocks)):
        if index in fallback:
            out.append(_Block(None, None, fallback[index]))
            continue
        blk = by_index[index]
        if not blk.is_weight:
            out.append(_Block(blk.q_out, None, blk.eigenvalues))
        elif blk.transposed:  # stored (D_in, D_out): the rows are the input side
            out.append(_Block(blk.input_basis(), blk.q_out, blk.eigenvalues.T))
        else:
            out.append(_Block(blk.q_out, blk.input_basis(), blk.eigenvalues))
    return out


def _rank_one_split(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(l_rows, l_cols) with outer(l_rows, l_cols) = values for a rank-one (rows, cols) matrix.

    l_rows = values 1 / sqrt(t), l_cols = 1^T values / sqrt(t), t = 1^T values 1 (exact for a rank-one matrix
    u v^T with t != 0). Only the products are defined by the posterior; this is posthoc's split of them.
    """
    total = values.sum()
    if float(total) == 0.0:
        return values.new_zeros(values.shape[0]), values.new_zeros(values.shape[1])
    root = total.abs().sqrt()
    return values.sum(1) / root, values.sum(0) / (root * total.sign())


def _check_scalar(value: Any) -> torch.Tensor | float:
    """A real number or a one-element tensor (laplace-torch's valid scalar), else ValueError."""
    if isinstance(value, Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.ndim <= 1:
        return value.reshape(())
    raise ValueError(f"a KronDecomposed can be multiplied by a scalar only (a number or a one-element tensor), "
                     f"got {value!r}")


class KronDecomposed:
    """The eigendecomposed Kronecker-factored posterior precision (laplace-torch's ``KronDecomposed`` behaviour).

    Built by ``la.posterior_precision`` for ``hessian_structure="kron"`` (or "ekfac") as
    ``KronDecomposed.from_structure(curvature, prior_precision, curvature_factor)``; ``+ deltas`` adds to the
    deltas and ``* scalar`` multiplies the curvature eigenvalues only (the deltas stay), both returning a new object,
    as in laplace-torch. Not provided: laplace-torch's ``damping`` (posthoc always adds the prior exactly in the
    eigenbasis; ``damping`` is False).

    Args:
        blocks: the per-tensor eigenstructures (from :meth:`from_structure`).
        factor: the curvature factor c (a number or a 0-d tensor).
        deltas: the additive prior precision per tensor, (n_tensors,).
        kronecker: whether each weight's eigenvalues are a Kronecker product (kron: True; EKFAC's corrected ones
            are not, so :attr:`eigenvalues` raises for them).
    """

    damping = False

    def __init__(self, blocks: list[_Block], factor: torch.Tensor | float, deltas: torch.Tensor,
                 kronecker: bool = True) -> None:
        self._blocks = blocks
        self._factor = factor
        self._kronecker = kronecker
        if deltas.shape != (len(blocks),):
            raise ValueError(f"deltas must have one entry per parameter tensor ({len(blocks)}), got shape "
                             f"{tuple(deltas.shape)}")
        self.deltas = deltas

    @classmethod
    def from_structure(cls, curvature: KronCurvature, prior_precision: torch.Tensor,
                       curvature_factor: torch.Tensor) -> "KronDecomposed":
        """The precision c H + delta of a fitted kron/ekfac structure (scalar or per-tensor prior); O(1), no copy.

        Raises:
            ValueError: a per-parameter prior precision (it has no eigenbasis form).
        """
        deltas = per_block(prior_precision, curvature.subset, curvature.structure.value)
        return cls(_blocks(curvature), curvature_factor, deltas, kronecker=not isinstance(curvature, EKFACCurvature))

    # ----------------------------------------------------------------- laplace-torch's attributes
    def __len__(self) -> int:
        """The number of parameter tensors (one delta each)."""
        return len(self._blocks)

    @property
    def eigenvectors(self) -> list[list[torch.Tensor]]:
        """Per tensor the factors' eigenbases: weight [Q_rows, Q_cols], bias [Q_G], diagonal block [I].

        The identity of a diagonal (fallback) block is built on access: O(n^2) memory for n entries.
        """
        out = []
        for blk in self._blocks:
            if blk.rows is None:
                out.append([torch.eye(blk.numel, dtype=blk.values.dtype, device=blk.values.device)])
            else:
                out.append([blk.rows] if blk.cols is None else [blk.rows, blk.cols])
        return out

    @property
    def eigenvalues(self) -> list[list[torch.Tensor]]:
        """Per tensor the factors' eigenvalues times c: weight [l_rows, l_cols], else [c E].

        For a weight outer(l_rows, l_cols) = c E.
        The split of a weight's eigenvalues between its two factors is posthoc's (see :func:`_rank_one_split`);
        laplace-torch's differs by a constant per layer, the products (the precision's eigenvalues) are equal.

        Raises:
            NotImplementedError: EKFAC, whose corrected eigenvalues are no Kronecker product (use
                :attr:`eigenvalue_matrices`).
        """
        if not self._kronecker:
            raise NotImplementedError("EKFAC's corrected eigenvalues are not a Kronecker product of two factors' "
                                      "eigenvalues; use eigenvalue_matrices (c E per tensor)")
        out = []
        for blk in self._blocks:
            if blk.cols is None:
                out.append([self._factor * blk.values])
            else:
                rows, cols = _rank_one_split(blk.values)
                root = math.sqrt(self._factor) if isinstance(self._factor, float) else self._factor.sqrt()
                out.append([root * rows, root * cols])
        return out

    @property
    def eigenvalue_matrices(self) -> list[torch.Tensor]:
        """Per tensor c E, the curvature's eigenvalues in the tensor's eigenbasis: (rows, cols) or (n,)."""
        return [self._factor * blk.values for blk in self._blocks]

    def _precision_values(self, index: int, exponent: float) -> torch.Tensor:
        """(c E_l + delta_l) ** exponent of tensor ``index``."""
        return torch.pow(self._factor * self._blocks[index].values + self.deltas[index], exponent)

    # ----------------------------------------------------------------- arithmetic (laplace-torch's semantics)
    def __add__(self, deltas: torch.Tensor | float) -> "KronDecomposed":
        """A new KronDecomposed with ``deltas`` (a scalar, (1,) or (n_tensors,)) added to the deltas.

        Raises:
            ValueError: another shape.
        """
        value = torch.as_tensor(deltas, dtype=self.deltas.dtype, device=self.deltas.device)
        if not (value.ndim == 0 or (value.ndim == 1 and len(value) in (1, len(self)))):
            raise ValueError(f"add a scalar, a (1,) tensor or one delta per parameter tensor ({len(self)},) to a "
                             f"KronDecomposed, got shape {tuple(value.shape)}")
        return KronDecomposed(self._blocks, self._factor, self.deltas + value, self._kronecker)

    def __mul__(self, scalar: torch.Tensor | float) -> "KronDecomposed":
        """A new KronDecomposed whose curvature eigenvalues are multiplied by ``scalar``; the deltas stay.

        Raises:
            ValueError: ``scalar`` is not a number or a one-element tensor.
        """
        return KronDecomposed(self._blocks, self._factor * _check_scalar(scalar), self.deltas, self._kronecker)

    __radd__ = __add__
    __rmul__ = __mul__

    def detach(self) -> "KronDecomposed":
        """A copy whose deltas and curvature factor are detached from the autograd graph."""
        factor = self._factor.detach() if isinstance(self._factor, torch.Tensor) else self._factor
        return KronDecomposed(self._blocks, factor, self.deltas.detach(), self._kronecker)

    # ----------------------------------------------------------------- linear algebra
    def logdet(self) -> torch.Tensor:
        """Log det of the whole precision, sum_l sum log(c E_l + delta_l), 0-d. Cost O(P)."""
        return sum((torch.log(self._precision_values(i, 1.0)).sum() for i in range(len(self))),
                   start=self.deltas.new_zeros(()))

    def _power_times(self, matrix: torch.Tensor, exponent: float) -> torch.Tensor:
        """Lambda ** exponent @ row vectors: matrix (N, P) -> (N, P). Cost O(N sum_l rows cols (rows + cols))."""
        parts, start = [], 0
        for index, blk in enumerate(self._blocks):
            part = matrix[:, start:start + blk.numel]
            start += blk.numel
            values = self._precision_values(index, exponent)
            if blk.rows is None:
                parts.append(part * values)
            elif blk.cols is None:
                parts.append(((part @ blk.rows) * values) @ blk.rows.T)
            else:
                grid = part.reshape(-1, *values.shape)
                rotated = blk.rows.T @ grid @ blk.cols * values
                parts.append((blk.rows @ rotated @ blk.cols.T).reshape(part.shape))
        if start != matrix.shape[-1]:
            raise ValueError(f"W has {matrix.shape[-1]} parameters per row, the precision {start}")
        return torch.cat(parts, dim=1)

    def bmm(self, W: torch.Tensor, exponent: float = -1) -> torch.Tensor:  # noqa: N803 (laplace-torch's name)
        """Lambda ** exponent applied to the parameter vectors of W: (P,), (N, P) or (B, K, P), same shape back.

        Cost O(B K sum_l rows cols (rows + cols)).

        Raises:
            ValueError: W of another rank or another number of parameters.
        """
        if W.ndim not in (1, 2, 3):
            raise ValueError(f"W must be (P,), (N, P) or (B, K, P), got shape {tuple(W.shape)}")
        return self._power_times(W.reshape(-1, W.shape[-1]), exponent).reshape(W.shape)

    def inv_square_form(self, W: torch.Tensor) -> torch.Tensor:  # noqa: N803
        """W Lambda^-1 W^T per batch entry: W (B, K, P) -> (B, K, K). Cost as :meth:`bmm`, plus O(B K^2 P)."""
        if W.ndim != 3:
            raise ValueError(f"W must be (B, K, P), got shape {tuple(W.shape)}")
        return W @ self.bmm(W, exponent=-1).mT

    def diag(self, exponent: float = 1) -> torch.Tensor:
        """The diagonal of Lambda ** exponent, (P,).

        Per weight (Q_rows∘Q_rows) V (Q_cols∘Q_cols)^T with V = (c E + delta) ** exponent. Cost
        O(sum_l rows cols (rows + cols)).
        """
        parts = []
        for index, blk in enumerate(self._blocks):
            values = self._precision_values(index, exponent)
            if blk.rows is None:
                parts.append(values)
            elif blk.cols is None:
                parts.append(blk.rows.square() @ values)
            else:
                parts.append((blk.rows.square() @ values @ blk.cols.square().T).reshape(-1))
        return torch.cat(parts)

    def to_matrix(self, exponent: float = 1) -> torch.Tensor:
        """The dense block-diagonal Lambda ** exponent, (P, P): for tests and small networks only (O(P^2) memory)."""
        dense = []
        for index, blk in enumerate(self._blocks):
            values = self._precision_values(index, exponent).reshape(-1)
            if blk.rows is None:
                dense.append(torch.diag(values))
                continue
            basis = blk.rows if blk.cols is None else torch.kron(blk.rows, blk.cols)
            dense.append((basis * values) @ basis.T)
        return torch.block_diag(*dense)
