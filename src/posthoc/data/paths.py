"""Where the full data sets live on disk."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV_VAR", "resolve_data_dir"]

DATA_ENV_VAR = "POSTHOC_DATA"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Root folder of the data sets.

    Order: the explicit ``data_dir``, else the environment variable
    ``POSTHOC_DATA``, else ``ValueError``. The folder is not checked here;
    missing files are reported, with their full path, when they are read.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    raise ValueError(
        "no data folder given: pass --data-dir (data_dir=...) or set the environment variable "
        f"{DATA_ENV_VAR} to the folder that holds FashionMNIST/, MNIST/, KMNIST/ and UCI/"
    )
