"""Checks on accumulated curvature, shared by every structure and the GGN eigensolver."""

from __future__ import annotations

import torch


def check_curvature_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise FloatingPointError if accumulated curvature holds NaN/Inf (e.g. from a diverged model).

    ``what`` names the curvature in the message (e.g. "diag", "lowrank"). Cost: one pass over ``tensor``.
    """
    if not bool(torch.all(torch.isfinite(tensor))):
        raise FloatingPointError(
            f"the {what} curvature contains NaN/Inf; check the model's outputs on the training data "
            "(a diverged or mis-scaled network)"
        )
