"""Temperature scaling (Guo et al. 2017) fitted on validation data."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from posthoc.predictive import GaussianPredictive
from posthoc.utils.checks import check_finite, check_labels


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The T > 0 that minimises the mean NLL of softmax(logits / T).

    Optimised over log T with L-BFGS (a 1-D convex problem in 1/T). Cost:
    O(max_iter * N * C). ``logits`` (N, C), ``labels`` (N,).
    """
    check_finite(logits, "logits")
    labels = check_labels(labels, logits.shape[-1], "labels")
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} logits but {len(labels)} labels")
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not 1e-3 < temperature < 1e3:
        raise RuntimeError(
            f"temperature fit diverged (T = {temperature:.3g}): the validation labels look unrelated to the "
            "logits; check that the labels match the inputs and the model is trained"
        )
    return temperature


class TemperatureScaling:
    """The MAP network with logits divided by a temperature fitted on validation NLL.

    ``fit(val_loader)`` must be given held-out data (never the test set).
    ``predict`` returns N(f(x)/T, 0). Cost: one forward pass per input.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.temperature: float | None = None

    @torch.no_grad()
    def fit(self, val_loader: DataLoader) -> "TemperatureScaling":
        """Fit the temperature T on the held-out ``(x, y)`` batches of ``val_loader`` (labels ``(B,)``).

        Cost: one forward pass over the validation data, then a 1-D fit on the stored logits (N, C).
        Returns ``self``.
        """
        logits, labels = [], []
        for x, y in val_loader:
            logits.append(self.model(x))
            labels.append(y)
        self.temperature = fit_temperature(torch.cat(logits), torch.cat(labels))
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> GaussianPredictive:
        """N(f(x) / T, 0) for inputs ``x`` (B, ...): scaled logits (B, C) with zero variance; one forward pass.

        Raises:
            RuntimeError: Before :meth:`fit`.
            ValueError: If ``x`` holds NaN or Inf.
        """
        if self.temperature is None:
            raise RuntimeError("call fit(val_loader) before predict")
        check_finite(x, "x")
        logits = self.model(x) / self.temperature
        return GaussianPredictive(logits, var=torch.zeros_like(logits))
