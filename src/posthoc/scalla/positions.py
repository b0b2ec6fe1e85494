"""ScaLLA on outputs with positions (B, ..., C): token- and pixel-level tasks (posthoc.network.positions).

The linearised Laplace being approximated is the one over every position: the network's flattened output
f_n = vec(outputs_n) (L·C entries, C fastest, ``ParameterSubset.flatten_positions``), the GGN
H = sum_n sum_t J_nt^T Gamma_nt J_nt over the kept positions t (targets other than ``ignore_index``), and the
predictive of position t the (C, C) block J_t Sigma J_t^T. ScaLLA's surrogate gives features per position,
phi(x, t) (m, C), so that phi(x, t)^T phi(x', t') approximates J_{x,t} J_{x',t'}^T, the NTK between positions
of any two inputs. Everything else follows the examples' case with positions in their place:

- training targets are the JVPs of the flattened output, J(x) v (L·C per input), and the surrogate's features
  are flattened alike, (B, m, L·C) (:class:`FlatPositions`), so both objectives fit the kernel between all
  positions of the batch's inputs (the "eigen" directions come from the GGN over every position of the
  subsample: the pool holds no targets);
- the latent posterior sums phi_t Gamma_t phi_t^T over the kept positions (:func:`kept_rows`), and N (the
  evidence's data count) counts them;
- the predictive is shaped (B, ..., C), with per-position covariances (B, ..., C, C)
  (:class:`posthoc.laplace.predict.PositionPredictive`).
"""

from __future__ import annotations

import torch
from torch import nn

from posthoc.likelihood import Likelihood
from posthoc.network.inputs import ModelInputs
from posthoc.network.positions import as_rows, kept_positions
from posthoc.scalla.surrogate import EvalModeModule


def flat_features(features: torch.Tensor) -> torch.Tensor:
    """Per-position features (B, ..., m, C) as one feature matrix per input, (B, m, L·C).

    Columns in the flattened outputs' order (positions row-major, C fastest), so phi^T phi is the kernel between
    the entries of f_n = vec(outputs_n). Cost: one copy.
    """
    batch, m, c = features.shape[0], features.shape[-2], features.shape[-1]
    return features.reshape(batch, -1, m, c).permute(0, 2, 1, 3).reshape(batch, m, -1)


class FlatPositions(EvalModeModule):
    """A per-position surrogate (B, ..., m, C) seen by the trainer as (B, m, L·C) (:func:`flat_features`)."""

    def __init__(self, surrogate: nn.Module) -> None:
        super().__init__()
        self.surrogate = surrogate
        self.eval()

    def forward(self, x: ModelInputs) -> torch.Tensor:
        """Features (B, m, L·C) of inputs x: one surrogate forward pass."""
        return flat_features(self.surrogate(x))


def feature_rows(features: torch.Tensor) -> torch.Tensor:
    """Per-position features (B, ..., m, C) as rows (B·L, m, C), positions row-major (a view where possible)."""
    return features.reshape(-1, *features.shape[-2:])


def kept_rows(features: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor, likelihood: Likelihood,
              ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept positions of a batch as rows: features (R, m, C), outputs (R, C), targets (R,) or (R, C).

    ``features`` (B, ..., m, C), ``outputs`` (B, ..., C), ``targets`` (B, ...) class indices (regression
    (B, ..., C)); R counts the positions whose target is not ``ignore_index`` (regression: all).
    """
    n_outputs = outputs.shape[-1]
    mask = kept_positions(targets, likelihood, ignore_index).reshape(-1)
    out_rows, target_rows = as_rows(outputs, targets, n_outputs, likelihood, ignore_index,
                                    position_dims=outputs.ndim - 2)
    return feature_rows(features)[mask], out_rows, target_rows


def ggn_targets(batch: int, n_positions: int, n_outputs: int, likelihood: Likelihood, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """Stand-in targets that keep every position, for GGN factors that do not read the labels.

    (batch, L) class 0 (classification) or (batch, L, C) zeros in ``dtype`` (regression), on ``device``. The pools of the "eigen" directions
    hold inputs only; the GGN's output Hessian of both likelihoods does not depend on the target.
    """
    if likelihood is Likelihood.CLASSIFICATION:
        return torch.zeros(batch, n_positions, dtype=torch.long, device=device)
    return torch.zeros(batch, n_positions, n_outputs, dtype=dtype, device=device)


def position_kernel(features_1: torch.Tensor, features_2: torch.Tensor) -> torch.Tensor:
    """k((x1_i, t), (x2_j, u)) = phi(x1_i, t)^T phi(x2_j, u): (B1, ..., B2, ..., C, C).

    From per-position features (B1, ..., m, C) and (B2, ..., m, C). Cost O(B1 L1 B2 L2 m C^2).
    """
    rows = torch.einsum("ika,jkb->ijab", feature_rows(features_1), feature_rows(features_2))
    return rows.reshape(*features_1.shape[:-2], *features_2.shape[:-2], *rows.shape[-2:])
