"""The command line every example shares: ``--quick`` (a seconds-long smoke run) and ``--out`` (figure folder).

Each example writes its figures and a ``<name>.json`` of the numbers it printed into ``--out``, so that the
test suite (tests/examples/) can check that a quick run produced finite numbers and the figures.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from torch.utils.data import TensorDataset

DEFAULT_OUT = Path(__file__).resolve().parent / "figures"


def parse_args(description: str) -> argparse.Namespace:
    """Parse ``--quick`` and ``--out`` (default examples/figures/, created) for an example script.

    Args:
        description: the example's one-line summary, shown by ``--help``.

    Returns:
        The namespace with ``quick`` (bool) and ``out`` (an existing ``Path``).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a smaller run that takes seconds (used by the tests)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for figures (default {DEFAULT_OUT})")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def write_metrics(out: Path, name: str, metrics: dict[str, float]) -> Path:
    """Print ``metrics`` and write them to ``out/<name>.json``; raise if one is not a finite number.

    Args:
        out: the example's output folder.
        name: the example's name (the file stem).
        metrics: name -> value of every number the example reports.

    Returns:
        The path of the JSON file.

    Raises:
        ValueError: if a value is NaN or infinite (the example went wrong; nothing is written).
    """
    bad = {key: value for key, value in metrics.items() if not math.isfinite(float(value))}
    if bad:
        raise ValueError(f"{name}: non-finite results {bad}")
    for key, value in metrics.items():
        print(f"{key:>32s}  {float(value):.4f}")
    path = out / f"{name}.json"
    path.write_text(json.dumps({key: float(value) for key, value in metrics.items()}, indent=2) + "\n")
    return path


def first(dataset: TensorDataset, n: int) -> TensorDataset:
    """The first n examples of a TensorDataset, as a TensorDataset."""
    return TensorDataset(*(t[:n] for t in dataset.tensors))
