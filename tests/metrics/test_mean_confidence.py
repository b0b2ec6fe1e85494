"""mean_confidence: the mean max-probability of an (N, C) predictive."""

import pytest
import torch

from posthoc.metrics import mean_confidence


def test_mean_confidence_hand_example() -> None:
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [0.875, 0.125]], dtype=torch.float64)
    assert mean_confidence(probs) == pytest.approx((0.75 + 0.75 + 0.5 + 0.875) / 4)


def test_mean_confidence_rejects_logits() -> None:
    with pytest.raises(ValueError, match="softmax"):
        mean_confidence(torch.tensor([[2.0, -1.0]]))
