"""Classification metrics: hand-computed cases, scikit-learn agreement, input errors."""

import math

import pytest
import torch
from sklearn.metrics import brier_score_loss, log_loss

from posthoc.metrics import CalibrationBins, accuracy, brier, calibration_bins, ece, nll

# Four points, C = 2, float64; all values are exact in binary.
#   point  probs          y  conf   pred  correct  bin (4 bins, right-closed)
#   1      [.75,  .25 ]   0  .75    0     yes      (.5, .75]  -> 2
#   2      [.25,  .75 ]   0  .75    1     no       (.5, .75]  -> 2
#   3      [.875, .125]   0  .875   0     yes      (.75, 1]   -> 3
#   4      [.5,   .5  ]   1  .5     0     no       (.25, .5]  -> 1   (tie -> class 0)
# bin 1: n=1, conf .5,   acc 0   -> |gap| .5
# bin 2: n=2, conf .75,  acc .5  -> |gap| .25
# bin 3: n=1, conf .875, acc 1   -> |gap| .125
# ECE = 1/4 * .5 + 2/4 * .25 + 1/4 * .125 = .125 + .125 + .03125 = .28125
# Brier: .0625+.0625, .5625+.5625, 2*.015625, .25+.25 -> (.125+1.125+.03125+.5)/4 = .4453125
PROBS = torch.tensor([[0.75, 0.25], [0.25, 0.75], [0.875, 0.125], [0.5, 0.5]], dtype=torch.float64)
Y = torch.tensor([0, 0, 0, 1])


def _random_probs(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    return torch.softmax(logits, dim=1), torch.randint(0, c, (n,), generator=g)


def test_hand_computed_example():
    assert accuracy(PROBS, Y) == 0.5
    assert ece(PROBS, Y, n_bins=4) == pytest.approx(0.28125, abs=1e-15)
    assert brier(PROBS, Y) == pytest.approx(0.4453125, abs=1e-15)
    expected_nll = -(math.log(0.75) + math.log(0.25) + math.log(0.875) + math.log(0.5)) / 4
    assert nll(PROBS, Y) == pytest.approx(expected_nll, abs=1e-15)


def test_calibration_bins_hand_example():
    b = calibration_bins(PROBS, Y, n_bins=4)
    assert isinstance(b, CalibrationBins)
    assert torch.equal(b.edges, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    assert b.counts.tolist() == [0, 1, 2, 1]
    assert torch.isnan(b.confidence[0]) and torch.isnan(b.accuracy[0])
    assert b.confidence[1:].tolist() == [0.5, 0.75, 0.875]
    assert b.accuracy[1:].tolist() == [0.0, 0.5, 1.0]
    assert b.n == 4 and b.n_bins == 4
    assert b.ece == pytest.approx(0.28125, abs=1e-15)


def test_bin_edges_are_right_closed():
    # Uniform over 4 classes: confidence exactly .25 belongs to (0, .25], the first bin.
    probs = torch.full((3, 4), 0.25, dtype=torch.float64)
    b = calibration_bins(probs, torch.tensor([0, 1, 2]), n_bins=4)
    assert b.counts.tolist() == [3, 0, 0, 0]
    # Confidence exactly 1 belongs to the last bin.
    b = calibration_bins(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), n_bins=15)
    assert b.counts[-1] == 1 and b.counts.sum() == 1


def test_default_bins_and_single_bin():
    probs, y = _random_probs(500, 5, 0)
    b = calibration_bins(probs, y)
    assert b.edges.shape == (16,) and b.counts.shape == (15,) and b.n == 500
    # One bin: ECE = |accuracy - mean confidence|.
    one = ece(probs, y, n_bins=1)
    assert one == pytest.approx(abs(accuracy(probs, y) - float(probs.max(1).values.mean())), abs=1e-12)


def test_ece_perfectly_calibrated_is_zero():
    # Confidence 1 and always right.
    probs = torch.eye(3, dtype=torch.float64)
    assert ece(probs, torch.tensor([0, 1, 2])) == 0.0


def test_float32_inputs():
    probs, y = _random_probs(200, 4, 1)
    assert nll(probs.float(), y) == pytest.approx(nll(probs, y), abs=1e-5)
    assert ece(probs.float(), y) == pytest.approx(ece(probs, y), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_nll_matches_sklearn_log_loss(seed):
    probs, y = _random_probs(300, 6, seed)
    ref = log_loss(y.numpy(), probs.numpy(), labels=list(range(6)))
    assert nll(probs, y) == pytest.approx(ref, abs=1e-6)


def test_nll_clamps_zero_probability():
    probs = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    value = nll(probs, torch.tensor([1]))
    assert math.isfinite(value)
    assert value == pytest.approx(-math.log(torch.finfo(torch.float64).tiny))
    value32 = nll(probs.float(), torch.tensor([1]))
    assert value32 == pytest.approx(-math.log(torch.finfo(torch.float32).tiny), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nll_of_half_precision_probabilities_is_not_capped_at_their_tiny(dtype):
    probs = torch.tensor([[1 - 6e-6, 6e-6], [0.5, 0.5], [1.0, 0.0]], dtype=torch.float64).to(dtype)
    value = nll(probs, torch.tensor([1, 0, 1]))
    p_true = probs[:2].double()[[0, 1], [1, 0]]
    expected = -(p_true.log().sum() + math.log(torch.finfo(torch.float32).tiny)) / 3
    assert value == pytest.approx(float(expected), rel=1e-12)


def test_binary_brier_is_twice_sklearn():
    # For C = 2: (p1 - y)^2 + (p0 - (1 - y))^2 = 2 (p1 - y)^2, while sklearn's binary
    # brier_score_loss scores the positive class only.
    probs, y = _random_probs(400, 2, 3)
    ref = brier_score_loss(y.numpy(), probs[:, 1].numpy())
    assert brier(probs, y) == pytest.approx(2 * ref, abs=1e-6)


def test_multiclass_brier_matches_direct_sum():
    probs, y = _random_probs(400, 7, 4)
    onehot = torch.nn.functional.one_hot(y, 7).double()
    ref = float(((probs - onehot) ** 2).sum(1).mean())
    assert brier(probs, y) == pytest.approx(ref, abs=1e-12)
    # scikit-learn >= 1.7 accepts (N, C) probabilities and then uses the same unscaled sum.
    try:
        sk = brier_score_loss(y.numpy(), probs.numpy(), labels=list(range(7)))
    except (TypeError, ValueError):
        pytest.skip("this scikit-learn has no multi-class brier_score_loss")
    assert brier(probs, y) == pytest.approx(sk, abs=1e-6)


def test_accuracy_matches_argmax():
    probs, y = _random_probs(300, 5, 5)
    assert accuracy(probs, y) == pytest.approx(float((probs.argmax(1) == y).double().mean()))


def test_float_labels_accepted():
    assert accuracy(PROBS, Y.double()) == 0.5


@pytest.mark.parametrize("fn", [accuracy, nll, brier, ece, calibration_bins])
def test_logits_rejected(fn):
    logits = torch.tensor([[2.0, -1.0], [0.3, 0.1]])
    with pytest.raises(ValueError, match="not logits"):
        fn(logits, torch.tensor([0, 1]))


@pytest.mark.parametrize("fn", [accuracy, nll, brier, ece])
def test_bad_inputs(fn):
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.tensor([[float("nan"), 0.5]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="labels must lie in"):
        fn(PROBS, torch.tensor([0, 0, 2, 1]))
    with pytest.raises(ValueError, match="must match"):
        fn(PROBS, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        fn(PROBS[0], torch.tensor([0]))
    with pytest.raises(ValueError, match="non-empty"):
        fn(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="probabilities"):
        fn(torch.tensor([[0.3, 0.3]]), torch.tensor([0]))  # rows do not sum to 1


def test_bad_n_bins():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n_bins"):
            calibration_bins(PROBS, Y, n_bins=bad)
