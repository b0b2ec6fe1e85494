"""Deprecated: moved to :mod:`posthoc.network.batches` (batch reading is not Laplace-specific)."""

import warnings

from posthoc.network.batches import (  # noqa: F401
    check_unpadded_shards,
    checked_batches,
    first_batch_inputs,
    split_batch,
)

warnings.warn("posthoc.laplace.batches is deprecated; import from posthoc.network.batches instead",
              DeprecationWarning, stacklevel=2)
