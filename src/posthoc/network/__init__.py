"""The network as a function of the weights an estimator covers, and reading its data.

The lowest layer above :mod:`posthoc.utils`: every estimator (Laplace, ScaLLA,
Streamlined, the fiber sampler) and the curvature code build on it, and it
imports none of them.

- :mod:`posthoc.network.subset`: which weights are covered (all, the last
  layer, a subnetwork) and the covered function ``forward(inputs, theta)``;
- :mod:`posthoc.network.batches`: validated (x, y) pairs from any DataLoader.
"""

from posthoc.network.subset import ParameterSubset, SubsetOfWeights

__all__ = ["ParameterSubset", "SubsetOfWeights"]
