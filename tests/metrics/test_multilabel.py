"""Multi-label metrics: every label of every example one binary prediction."""

from __future__ import annotations

import math

import pytest
import torch

from posthoc.metrics import multilabel_brier, multilabel_ece, multilabel_nll

DTYPE = torch.float64


def test_nll_is_the_mean_bce_over_labels():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(7, 3, generator=g, dtype=DTYPE)
    y = (torch.rand(7, 3, generator=g) < 0.5).to(DTYPE)
    expected = torch.nn.functional.binary_cross_entropy(probs, y)
    assert math.isclose(multilabel_nll(probs, y), float(expected), rel_tol=1e-12)
    assert math.isclose(multilabel_brier(probs, y), float(((probs - y) ** 2).mean()), rel_tol=1e-12)


def test_single_label_vectors_are_accepted():
    probs, y = torch.tensor([0.9, 0.2], dtype=DTYPE), torch.tensor([1, 0])
    assert math.isclose(multilabel_nll(probs, y), -(math.log(0.9) + math.log(0.8)) / 2, rel_tol=1e-12)
    assert math.isclose(multilabel_nll(probs[:, None], y), multilabel_nll(probs, y))


def test_ece_pools_the_label_decisions():
    # confidences max(p, 1 - p): 0.9, 0.9, 0.6, 0.6 -> bins (0.8667, 0.9333] and (0.6, 0.6667] with 15 bins;
    # correct (p > 1/2 predicts 1): 1, 0 | 1, 1 -> gaps |0.5 - 0.9| and |1 - 0.6|, each half the points
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6]], dtype=DTYPE)
    y = torch.tensor([[1, 1], [0, 1]])
    assert math.isclose(multilabel_ece(probs, y), 0.5 * 0.4 + 0.5 * 0.4, rel_tol=1e-12)


@pytest.mark.parametrize(("probs", "y", "error", "message"), [
    (torch.tensor([[0.5, 1.5]]), torch.tensor([[0, 1]]), ValueError, "label probabilities in"),
    (torch.tensor([[0.5, 0.5]]), torch.tensor([[0, 2]]), ValueError, "0/1 targets"),
    (torch.tensor([[0.5, 0.5]]), torch.tensor([[0, 1, 1]]), ValueError, "shape of probs"),
    (torch.tensor([[1, 0]]), torch.tensor([[0, 1]]), TypeError, "floating-point"),
])
def test_bad_inputs_are_clear_errors(probs, y, error, message):
    with pytest.raises(error, match=message):
        multilabel_nll(probs, y)
