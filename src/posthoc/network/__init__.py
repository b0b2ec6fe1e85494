"""The network as a function of the weights an estimator covers, and reading its data.

The lowest layer above :mod:`posthoc.utils`: every estimator (Laplace, ScaLLA,
Streamlined, the fiber sampler) and the curvature code build on it, and it
imports none of them.

- :mod:`posthoc.network.subset`: which weights are covered (all, the last
  layer, a subnetwork) and the covered function ``forward(inputs, theta)``;
- :mod:`posthoc.network.batches`: validated (x, y) pairs from any DataLoader;
- :mod:`posthoc.network.inputs`: model inputs as tensors, tuples or mappings (slicing, placement, checks)
  and :class:`~posthoc.network.inputs.ModelCall`, which calls the model on them and reads its output;
- :mod:`posthoc.network.probes`: whether a forward pass can be vmapped over examples.
"""

from posthoc.network.subset import ParameterSubset, SubsetOfWeights

__all__ = ["ParameterSubset", "SubsetOfWeights"]
