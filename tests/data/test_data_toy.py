import torch

from posthoc.data import GAP_INTERVAL, blobs, gap_function, gap_regression, two_moons


def test_two_moons():
    x, y = two_moons(201, noise=0.1, seed=3)
    assert x.shape == (201, 2) and x.dtype == torch.float32
    assert y.shape == (201,) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [101, 100]
    x2, y2 = two_moons(201, noise=0.1, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, two_moons(201, noise=0.1, seed=4)[0])
    # without noise the points lie exactly on the two unit half circles
    x0, y0 = two_moons(50, noise=0.0)
    upper = x0[y0 == 0]
    lower = x0[y0 == 1] - torch.tensor([1.0, 0.5])
    assert torch.allclose(upper.norm(dim=1), torch.ones(25), atol=1e-5)
    assert torch.allclose(lower.norm(dim=1), torch.ones(25), atol=1e-5)


def test_blobs():
    x, y = blobs(301, n_classes=4, std=0.3, seed=1)
    assert x.shape == (301, 2) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [76, 75, 75, 75]
    assert torch.equal(x, blobs(301, n_classes=4, std=0.3, seed=1)[0])
    centre0 = x[y == 0].mean(0)
    assert torch.allclose(centre0, torch.tensor([2.0, 0.0]), atol=0.15)


def test_gap_regression():
    x, y = gap_regression(160, noise=0.1, seed=0)
    assert x.shape == (160, 1) and y.shape == (160, 1) and x.dtype == y.dtype == torch.float32
    lo, hi = GAP_INTERVAL
    inside = (x > lo) & (x < hi)
    assert not bool(inside.any())
    assert int((x < lo).sum()) == 80 and int((x > hi).sum()) == 80
    x2, y2 = gap_regression(160, noise=0.1, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x0, y0 = gap_regression(40, noise=0.0, seed=1)
    assert torch.allclose(y0, gap_function(x0), atol=1e-5)
