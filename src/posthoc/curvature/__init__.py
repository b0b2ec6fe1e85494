"""Curvature of the log-likelihood in the outputs and its products with Jacobians.

Every curvature posthoc uses has the form H = sum_n J_n^T S_n S_n^T J_n, with
S_n (C, K) an output-space factor from :mod:`posthoc.curvature.output_factors`
(the GGN's Gamma_n^{1/2}, sampled-label gradients, or the loss gradient for the
empirical Fisher), and J_n the Jacobian of the outputs in the covered weights.
"""

from posthoc.curvature.output_factors import CurvatureType, OutputFactors

__all__ = ["CurvatureType", "OutputFactors"]
