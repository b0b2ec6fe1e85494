"""Deprecated: moved to :mod:`posthoc.network.subset` (ParameterSubset is not Laplace-specific)."""

import warnings

from posthoc.network.subset import (  # noqa: F401
    ParamBlock,
    ParameterSubset,
    SubsetOfWeights,
    Tail,
    check_materialised,
)

warnings.warn("posthoc.laplace.subset is deprecated; import from posthoc.network.subset instead",
              DeprecationWarning, stacklevel=2)
