"""Where the full data sets live on disk."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV_VAR", "resolve_data_dir"]

DATA_ENV_VAR = "POSTHOC_DATA"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Root folder of the data sets.

    Order: the explicit ``data_dir``, else (``None``) the environment variable
    ``POSTHOC_DATA``, else ``ValueError``. An empty ``data_dir`` is a
    ``ValueError`` too, not a silent fall-back to the environment. The folder
    is not checked here; missing files are reported, with their full path,
    when they are read.
    """
    if data_dir is not None:
        if not str(data_dir).strip():
            raise ValueError("data_dir is an empty path; pass the folder that holds FashionMNIST/, MNIST/, KMNIST/ "
                             f"and UCI/, or None (no --data-dir) to use the environment variable {DATA_ENV_VAR}")
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    raise ValueError(
        "no data folder given: pass --data-dir (data_dir=...) or set the environment variable "
        f"{DATA_ENV_VAR} to the folder that holds FashionMNIST/, MNIST/, KMNIST/ and UCI/"
    )
