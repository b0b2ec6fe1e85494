"""Small shared helpers: input checks and atomic file writes."""

from posthoc.utils.checks import (
    check_choice,
    check_finite,
    check_labels,
    check_ndim,
    check_positive,
)
from posthoc.utils.io import atomic_save_torch, atomic_write_bytes, atomic_write_text

__all__ = [
    "check_choice",
    "check_finite",
    "check_labels",
    "check_ndim",
    "check_positive",
    "atomic_save_torch",
    "atomic_write_bytes",
    "atomic_write_text",
]
