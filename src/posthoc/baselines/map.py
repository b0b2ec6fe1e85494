"""The MAP network as a predictive with zero variance."""

from __future__ import annotations

import torch
from torch import nn

from posthoc.predictive import GaussianPredictive
from posthoc.utils.checks import check_finite


class MAP:
    """The trained network alone: N(f(x; theta*), 0).

    ``predict`` returns a GaussianPredictive with zero variance, so every link
    gives softmax(f) (except the Laplace bridge, undefined at zero variance).
    Cost: one forward pass.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    def fit(self, train_loader=None) -> "MAP":
        """Nothing to fit; present so every method has the same shape."""
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> GaussianPredictive:
        """N(f(x), 0) for inputs ``x`` (B, ...): the network's outputs (B, C) with zero variance.

        Cost: one forward pass.

        Raises:
            ValueError: If ``x`` holds NaN or Inf.
        """
        check_finite(x, "x")
        logits = self.model(x)
        return GaussianPredictive(logits, var=torch.zeros_like(logits))
