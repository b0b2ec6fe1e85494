"""Outputs with positions, (B, ..., C): token- and pixel-level tasks, each position one output of the likelihood.

A model may return C outputs at every position of an example: (B, T, C) per token (a language model head),
(B, H, W, C) per pixel. Every position is then one observation: classification is a categorical per position
over the last dimension, regression a Gaussian per position. Targets are (B, ...) class indices (or
(B, ..., C) values for regression), and a classification position whose target is ``ignore_index`` (-100,
PyTorch's and laplace-torch's spelling) is skipped: it adds nothing to the curvature or to log p(D | theta),
and N counts the positions kept. Regression keeps every position (a value of -100 is a valid target).

The layout is channels last, (B, ..., C), as laplace-torch reads it. A model returning channels first
(B, C, H, W) with targets (B, H, W) is refused with the fix: ``output_fn=lambda out: out.movedim(1, -1)``.

How the curvature code sees it. The covered function is flattened to f_n = vec(outputs_n), (B, L·C) with the
L = prod(...) positions in row-major order and C fastest (``ParameterSubset.flatten_positions``). The output
Hessian of one example is then block-diagonal over positions, Gamma_n = blockdiag_t(Gamma_nt) with
Gamma_nt = 0 at ignored positions, and :class:`PositionFactors` gives its root S_n (L·C, L·K) from the (R, C)
rows of the kept positions, so H = sum_n J_n^T S_n S_n^T J_n = sum_n sum_t J_nt^T Gamma_nt J_nt exactly
(full and diag; K backward passes per kept position). KFAC then treats the L·K columns like the columns of
more examples: its G sums them, its A averages a layer's inputs over examples and positions (the "expand"
convention), the usual approximation for weights shared over positions. The Monte Carlo GGN draws one label
per kept position and sums the positions' columns into K = mc_samples columns (cross terms of independent
zero-mean draws vanish in expectation, so it stays unbiased at K backward passes per example). The empirical
Fisher is per position too: one column r_nt = p_nt - onehot(y_nt) per kept position (block-diagonal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from posthoc.likelihood import Likelihood
from posthoc.network.inputs import ModelCall, ModelInputs, as_model_inputs, batch_size, place, take
from posthoc.utils.checks import check_finite, check_labels

if TYPE_CHECKING:  # only for annotations
    from posthoc.network.subset import ParameterSubset

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss's default ignore_index, which laplace-torch's metrics use too


def check_layout(output_shape: tuple[int, ...], target_shape: tuple[int, ...], likelihood: Likelihood) -> None:
    """Raise ValueError unless outputs (B, ..., C) and targets (B, ...) (regression (B, ..., C)) agree.

    Positions are read channels last; outputs (B, C, H, W) beside targets (B, H, W) are named as channels
    first, with the fix.
    """
    out, tgt = tuple(output_shape), tuple(target_shape)
    expected = out[1:-1] if likelihood is Likelihood.CLASSIFICATION else out[1:]
    if tgt[1:] == expected:
        return
    if likelihood is Likelihood.CLASSIFICATION and len(out) >= 3 and tgt[1:] == out[2:]:
        raise ValueError(f"the model returns outputs {out} and the targets are {tgt}, as if the classes were in "
                         "dimension 1 (channels first, as nn.Conv2d gives them); posthoc reads positions channels "
                         "last, (B, ..., C): pass output_fn=lambda out: out.movedim(1, -1), or give targets "
                         f"{('B',) + out[1:-1]} if the classes are last")
    raise ValueError(f"the model returns outputs {out} with positions, so the targets must be "
                     f"{('B',) + expected} (one {'class index' if likelihood is Likelihood.CLASSIFICATION else 'value'}"
                     f" per position{'' if likelihood is Likelihood.CLASSIFICATION else ' and output'}), got {tgt}")


def check_position_targets(y: torch.Tensor, likelihood: Likelihood, n_outputs: int | None, position_dims: int,
                           ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """Targets of an output with ``position_dims`` position dimensions, checked.

    Classification: class indices (B, ...) of ``position_dims`` dimensions after B, in [0, C) or equal to
    ``ignore_index`` (returned int64). Regression: finite values (B, ..., C) (returned in ``dtype``).

    Raises:
        ValueError: another number of dimensions, labels out of range, non-finite regression targets.
    """
    if likelihood is Likelihood.CLASSIFICATION:
        if y.ndim != 1 + position_dims:
            raise ValueError(f"the model's outputs have {position_dims} position dimension(s), so classification "
                             f"targets must be class indices (B, ...) with {1 + position_dims} dimensions, got "
                             f"{tuple(y.shape)}")
        kept = y[y != ignore_index]
        if n_outputs is not None:
            check_labels(kept.reshape(-1), n_outputs, "targets")
        return y.long()
    if y.ndim != 2 + position_dims or (n_outputs is not None and y.shape[-1] != n_outputs):
        raise ValueError(f"the model's outputs have {position_dims} position dimension(s), so regression targets "
                         f"must be (B, ..., C) with {2 + position_dims} dimensions, got {tuple(y.shape)}")
    return check_finite(y.to(dtype), "targets")


def kept_positions(targets: torch.Tensor, likelihood: Likelihood, ignore_index: int) -> torch.Tensor:
    """Boolean (B, ...) mask of the positions that count: targets not ``ignore_index`` (regression: all)."""
    if likelihood is Likelihood.CLASSIFICATION:
        return targets != ignore_index
    return torch.ones(targets.shape[:-1], dtype=torch.bool, device=targets.device)


def observations(batch: int, targets: torch.Tensor, likelihood: Likelihood, ignore_index: int,
                 position_dims: int) -> int:
    """What N counts in a batch of ``batch`` examples: the examples, or the kept positions (:func:`kept_positions`)."""
    if not position_dims:
        return batch
    return int(kept_positions(targets, likelihood, ignore_index).sum())


def as_rows(outputs: torch.Tensor, targets: torch.Tensor, n_outputs: int, likelihood: Likelihood,
            ignore_index: int, position_dims: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept positions as rows: outputs (R, C) and targets (R,) or (R, C), R = positions kept.

    ``outputs`` are flattened (B, L·C) or shaped (B, ..., C); ``targets`` (B, ...) or (B, ..., C). Outputs
    without positions (``position_dims`` 0) come back unchanged.
    """
    if not position_dims:
        return outputs, targets
    mask = kept_positions(targets, likelihood, ignore_index).reshape(-1)
    rows = outputs.reshape(-1, n_outputs)[mask]
    if likelihood is Likelihood.CLASSIFICATION:
        return rows, targets.reshape(-1)[mask]
    return rows, targets.reshape(-1, n_outputs)[mask]


class PositionFactors:
    """Output factors S (B, L·C, U·K) of flattened position outputs, from a per-row factor function.

    Args:
        factors: ``factors(outputs (R, C), targets (R,) or (R, C)) -> S (R, C, K)``, e.g.
            :class:`posthoc.curvature.OutputFactors` (its other attributes are read through this object).
        n_outputs: C.
        likelihood: the likelihood (which positions are kept: :func:`kept_positions`).
        ignore_index: the classification target of skipped positions.
        sum_positions: sum the positions' columns into K (the Monte Carlo GGN) instead of a block-diagonal S.

    Memory B·L²·C·K for the block-diagonal root (B·L·C·K summed).
    """

    def __init__(self, factors: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n_outputs: int,
                 likelihood: Likelihood, ignore_index: int = IGNORE_INDEX, sum_positions: bool = False) -> None:
        self.factors, self.n_outputs, self.likelihood = factors, n_outputs, likelihood
        self.ignore_index, self.sum_positions = ignore_index, sum_positions

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """S (B, L·C, U·K) (``sum_positions``: (B, L·C, K)) for outputs (B, L·C) and targets of their positions.

        U <= L counts the positions kept in at least one example of the batch.
        """
        batch, n_out = outputs.shape[0], self.n_outputs
        mask = kept_positions(targets, self.likelihood, self.ignore_index).reshape(batch, -1)  # (B, L)
        n_pos = mask.shape[1]
        if outputs.shape[1] != n_pos * n_out:
            raise ValueError(f"outputs of {outputs.shape[1]} entries per example do not hold {n_pos} positions of "
                             f"{n_out} outputs, as the targets {tuple(targets.shape)} say")
        rows = self.factors(*as_rows(outputs, targets, n_out, self.likelihood, self.ignore_index))  # (R, C, K)
        n_cols = rows.shape[-1]
        blocks = rows.new_zeros(batch, n_pos, n_out, n_cols)
        blocks[mask] = rows
        if self.sum_positions:
            return blocks.reshape(batch, n_pos * n_out, n_cols)
        # S[b, (t, c), (u, k)] = blocks[b, t, c, k] * [t == u], for the positions u kept in some example (the
        # columns of a position ignored in every example, e.g. the padding at the end, are zero: dropped)
        used = torch.eye(n_pos, dtype=rows.dtype, device=rows.device)[:, mask.any(0)]
        return torch.einsum("btck,tu->btcuk", blocks, used).reshape(batch, n_pos * n_out, -1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.factors, name)


def first_batch_layout(loader: Iterable, call: ModelCall, likelihood: Likelihood, dict_key_x: str, dict_key_y: str,
                       dtype: torch.dtype, device: torch.device, mapping_inputs: bool = False,
                       ignore_index: int = IGNORE_INDEX) -> tuple[ModelInputs, int, int]:
    """The first batch's checked inputs, the number of outputs C and the position dimensions of the outputs.

    Like :func:`posthoc.network.batches.first_batch_inputs`, but outputs (B, ..., C) are accepted: their targets
    are checked (:func:`check_position_targets`, :func:`check_layout`). Cost: one forward pass of one example.

    Raises:
        ValueError: an empty loader; outputs that are not (B, C) or (B, ..., C); targets that do not match the
            outputs' positions (:func:`check_layout`).
    """
    from posthoc.network.batches import checked_batches, split_batch  # batches imports this module's checks

    first = next(iter(loader), None)
    if first is None:
        raise ValueError("the training loader yielded no batches: nothing to fit")
    x, _ = split_batch(first, dict_key_x, dict_key_y, mapping_inputs)
    with torch.no_grad():
        out0 = call(take(place(as_model_inputs(x, "inputs"), device, dtype), 0, 1))
    if out0.ndim < 2:
        raise ValueError(f"the model must return (B, C) or (B, ..., C) outputs, got {tuple(out0.shape)} for one "
                         "example (a batch of 1, as the fit first calls it): a .squeeze() in the forward drops the "
                         "batch or output axis; keep (B, 1) for one output, or select the output with output_fn=")
    position_dims = out0.ndim - 2
    if position_dims and likelihood is Likelihood.BINARY:
        raise NotImplementedError(f"likelihood='binary' needs outputs (B, K), got {tuple(out0.shape)} (outputs with "
                                  "positions are supported for 'classification' and 'regression')")
    x0, y0 = next(iter(checked_batches([first], likelihood, None, dict_key_x, dict_key_y, dtype, device,
                                       mapping_inputs=mapping_inputs, position_dims=position_dims,
                                       ignore_index=ignore_index)))
    if position_dims:
        check_layout(tuple(out0.shape), tuple(y0[:1].shape), likelihood)
    return x0, out0.shape[-1], position_dims


def unflattened_shape(subset: ParameterSubset, inputs: ModelInputs) -> tuple[int, ...]:
    """(B, ..., C), the covered function's output shape on ``inputs`` before flattening: one example's forward."""
    flat, subset.flatten_positions = subset.flatten_positions, False
    try:
        with torch.no_grad():
            one = subset.forward(take(inputs, 0, 1))
    finally:
        subset.flatten_positions = flat
    return (batch_size(inputs), *one.shape[1:])


def position_blocks(cov: torch.Tensor, n_outputs: int) -> torch.Tensor:
    """The per-position (B, L, C, C) diagonal blocks of a flattened covariance (B, L·C, L·C)."""
    batch, size = cov.shape[:2]
    n_pos = size // n_outputs
    blocks = cov.reshape(batch, n_pos, n_outputs, n_pos, n_outputs)
    return torch.diagonal(blocks, dim1=1, dim2=3).permute(0, 3, 1, 2)
