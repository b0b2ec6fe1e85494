"""Small seeded toy data sets for examples, plots and tests.

All draws use ``numpy.random.default_rng(seed)``, so a seed gives the same
data on every run and platform. Every generator costs O(n).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from posthoc.utils.checks import check_positive_int

__all__ = ["two_moons", "blobs", "gap_regression", "gap_function", "GAP_INTERVAL", "GAP_CLUSTERS"]

# gap_regression draws inputs uniformly from these two intervals; GAP_INTERVAL stays empty.
GAP_CLUSTERS: tuple[tuple[float, float], tuple[float, float]] = ((-2.0, -0.75), (0.75, 2.0))
GAP_INTERVAL: tuple[float, float] = (GAP_CLUSTERS[0][1], GAP_CLUSTERS[1][0])


def _class_sizes(n: int, k: int) -> list[int]:
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def _shuffled(rng: np.random.Generator, x: np.ndarray, y: np.ndarray,
              y_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    perm = rng.permutation(x.shape[0])
    return (torch.from_numpy(x[perm].astype(np.float32)),
            torch.from_numpy(y[perm]).to(y_dtype))


def two_moons(n: int = 200, noise: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved half circles: x float32 ``(n, 2)``, y int64 ``(n,)`` in {0, 1}.

    Class 0 (ceil(n/2) points): ``(cos t, sin t)``; class 1 (floor(n/2)
    points): ``(1 - cos t, 0.5 - sin t)``; ``t`` evenly spaced on [0, pi] per
    class. Independent Gaussian noise of standard deviation ``noise`` is added
    to both coordinates, then the points are shuffled.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    rng = np.random.default_rng(seed)
    n0, n1 = _class_sizes(n, 2)
    t0, t1 = np.linspace(0.0, math.pi, n0), np.linspace(0.0, math.pi, n1)
    x = np.concatenate([
        np.stack([np.cos(t0), np.sin(t0)], axis=1),
        np.stack([1.0 - np.cos(t1), 0.5 - np.sin(t1)], axis=1),
    ])
    x = x + noise * rng.standard_normal(x.shape)
    y = np.concatenate([np.zeros(n0, dtype=np.int64), np.ones(n1, dtype=np.int64)])
    return _shuffled(rng, x, y, torch.int64)


def blobs(n: int = 300, n_classes: int = 3, std: float = 0.5,
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Isotropic Gaussian clusters: x float32 ``(n, 2)``, y int64 ``(n,)`` in [0, n_classes).

    Class ``k`` has centre ``2 (cos(2 pi k / K), sin(2 pi k / K))`` (K =
    ``n_classes``, centres on a circle of radius 2) and standard deviation
    ``std`` per coordinate; classes have n // K points, the first n % K one
    more. Points are shuffled.
    """
    check_positive_int(n_classes, "n_classes")
    check_positive_int(n, "n", "the number of points")
    if n < n_classes:
        raise ValueError(f"need n >= n_classes >= 1, got n={n}, n_classes={n_classes}")
    rng = np.random.default_rng(seed)
    sizes = _class_sizes(n, n_classes)
    angles = 2.0 * math.pi * np.arange(n_classes) / n_classes
    centres = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    y = np.repeat(np.arange(n_classes, dtype=np.int64), sizes)
    x = centres[y] + std * rng.standard_normal((n, 2))
    return _shuffled(rng, x, y, torch.int64)


def gap_function(x: torch.Tensor) -> torch.Tensor:
    """The noise-free regression function of :func:`gap_regression`: ``sin(2x) + 0.3x``."""
    return torch.sin(2.0 * x) + 0.3 * x


def gap_regression(n: int = 160, noise: float = 0.1,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D regression with a gap in the inputs: x float32 ``(n, 1)``, y float32 ``(n, 1)``.

    Inputs are uniform on two clusters, [-2, -0.75] (ceil(n/2) points) and
    [0.75, 2] (floor(n/2) points), so the interval ``GAP_INTERVAL`` =
    (-0.75, 0.75) holds no data and a good predictive uncertainty should grow
    there. Targets: ``y = sin(2x) + 0.3x + noise * eps`` with eps standard
    normal (see :func:`gap_function`). Points are shuffled.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    rng = np.random.default_rng(seed)
    sizes = _class_sizes(n, 2)
    x = np.concatenate([rng.uniform(lo, hi, size) for (lo, hi), size in zip(GAP_CLUSTERS, sizes, strict=True)])
    y = np.sin(2.0 * x) + 0.3 * x + noise * rng.standard_normal(n)
    xt, yt = _shuffled(rng, x[:, None], y[:, None], torch.float32)
    return xt, yt
