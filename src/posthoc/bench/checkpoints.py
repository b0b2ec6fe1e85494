"""Finding the MAP checkpoint a benchmark script runs on: the one it was given, or one in the training cache."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from posthoc.models.training import default_checkpoint_dir

__all__ = ["find_map_checkpoint"]


def find_map_checkpoint(checkpoint: str | os.PathLike | None, patterns: Sequence[str],
                        cache_dir: str | os.PathLike | None = None) -> Path:
    """The MAP checkpoint to load: ``checkpoint`` when given, else a cached one.

    Without ``checkpoint``, the training cache (``cache_dir``, default
    ``posthoc.models.training.default_checkpoint_dir()``, i.e. ``$POSTHOC_CACHE/checkpoints``) is searched
    with each glob of ``patterns`` in turn (e.g. ``("fmnist_cnn-e40-*.pt", "fmnist_cnn-*.pt")``); the first
    pattern with a match gives its first file in name order. Cost: one directory listing per pattern.

    Raises FileNotFoundError when the given checkpoint does not exist, or when nothing in the cache matches
    (naming the folder, the patterns and the fix: ``posthoc train`` or ``--checkpoint``).
    """
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"MAP checkpoint {path} does not exist; pass the file that `posthoc train` "
                                    "wrote (--checkpoint)")
        return path
    directory = Path(cache_dir) if cache_dir is not None else default_checkpoint_dir()
    for pattern in patterns:
        found = sorted(directory.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"no MAP checkpoint matching {', '.join(patterns)} in {directory} (the training "
                            "cache, $POSTHOC_CACHE/checkpoints); train one with `posthoc train` (or "
                            "posthoc.bench.runner.train_suite_model) or pass --checkpoint PATH")
