"""Seeded, stratified hold-out splits."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["stratified_split"]


def stratified_split(labels: np.ndarray | torch.Tensor, n_holdout: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..N-1`` into a kept part and a class-balanced hold-out part.

    ``labels``: integer class labels, shape ``(N,)`` (numpy or torch).
    Each class present in ``labels`` gets ``n_holdout // n_classes`` hold-out
    indices; when ``n_holdout`` is not a multiple of the number of classes the
    remaining ones go, one each, to the smallest class values. Within each
    class (in increasing class order) the indices are drawn with
    ``numpy.random.default_rng(seed).permutation``, so the split is fixed by
    ``seed`` and the same on every run and platform.

    Returns ``(keep_idx, holdout_idx)``: disjoint, sorted int64 arrays that
    together cover ``0..N-1``. Cost: O(N * n_classes).

    Raises ``ValueError`` if a class has fewer samples than its share.
    """
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {y.shape}")
    if n_holdout < 0 or n_holdout > y.shape[0]:
        raise ValueError(f"n_holdout must be in [0, {y.shape[0]}], got {n_holdout}")
    classes = np.unique(y)
    base, extra = divmod(int(n_holdout), max(len(classes), 1))
    rng = np.random.default_rng(seed)
    chosen = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(y == c)
        k = base + (1 if i < extra else 0)
        if k > members.size:
            raise ValueError(
                f"class {c!r} has {members.size} samples but {k} are needed for a stratified "
                f"hold-out of {n_holdout} over {len(classes)} classes"
            )
        chosen.append(members[rng.permutation(members.size)[:k]])
    holdout = np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)
    mask = np.ones(y.shape[0], dtype=bool)
    mask[holdout] = False
    return np.flatnonzero(mask).astype(np.int64), holdout.astype(np.int64)
