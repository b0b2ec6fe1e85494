"""The linearised Laplace approximation in function space (the exact GP form; see docs/laplace.md).

f(x*) ~ N(f(x*; theta*), Sigma(x*)) with kernel K(x, x') = J(x) D^-1 J(x')^T
(D = diag(delta), the prior precision) and

    Sigma(x*) = K** - K*X S (I + S^T K_XX S)^-1 S^T K_X*,

where S = blockdiag(S_n) with S_n S_n^T = s * Gamma_n (so the singular softmax
Hessian needs no inverse). By the Woodbury identity this equals the weight-space
glm predictive with the full GGN posterior. Cost O((NC)^3) and dense
Jacobians (N, C, P): the reference for small problems, not a method for large N.
"""

from __future__ import annotations

import torch

from posthoc.curvature.jacobians import per_example_jacobians
from posthoc.curvature.output_factors import CurvatureType, OutputFactors
from posthoc.laplace.prior import as_prior_tensor, per_parameter
from posthoc.likelihood import Likelihood
from posthoc.network.subset import ParameterSubset
from posthoc.predictive import GaussianPredictive


def exact_lla(
    subset: ParameterSubset,
    x_train: torch.Tensor,
    x_test: torch.Tensor,
    likelihood: Likelihood | str,
    prior_precision: float | torch.Tensor = 1.0,
    sigma_noise: float = 1.0,
) -> GaussianPredictive:
    """The exact function-space LLA predictive at ``x_test`` given training inputs ``x_train``.

    Inputs are model inputs (the subset computes its own, e.g. last-layer features); a ``last_layer`` subset
    not yet located is located on ``x_train`` first.
    Returns a GaussianPredictive with full (B, C, C) covariance (no observation noise).
    """
    if not subset.last_layer_located:  # a last layer still at its provisional guess: locate it on the data
        subset.capture(x_train)
    factors = OutputFactors(likelihood, CurvatureType.GGN)
    prior_inv = 1.0 / per_parameter(as_prior_tensor(prior_precision, subset), subset)
    inputs_train, inputs_test = subset.inputs(x_train), subset.inputs(x_test)
    jac_x = per_example_jacobians(subset, inputs_train)  # (N, C, P)
    jac_s = per_example_jacobians(subset, inputs_test)  # (B, C, P)
    n, c, _ = jac_x.shape
    with torch.no_grad():
        s = factors(subset.forward(inputs_train), torch.zeros(n, dtype=torch.long))  # (N, C, K)
    scale = factors.scale(torch.as_tensor(sigma_noise, dtype=subset.dtype))
    s = s * scale.sqrt()
    k = s.shape[-1]
    # J^T S per training point: (N, K, P) -> rows of the (NK, P) matrix S^T J_X
    st_j = torch.einsum("nck,ncp->nkp", s, jac_x).reshape(n * k, -1)
    inner = torch.eye(n * k, dtype=subset.dtype) + (st_j * prior_inv) @ st_j.T
    cross = torch.einsum("bcp,mp->bcm", jac_s * prior_inv, st_j)  # K*X S: (B, C, NK)
    chol = torch.linalg.cholesky(inner)
    white = torch.linalg.solve_triangular(chol, cross.reshape(-1, n * k).T, upper=False)  # (NK, B*C)
    white = white.T.reshape(jac_s.shape[0], c, n * k)
    k_star = torch.einsum("bcp,bdp->bcd", jac_s * prior_inv, jac_s)
    cov = k_star - white @ white.transpose(1, 2)
    with torch.no_grad():
        mean = subset.forward(inputs_test)  # = model(x_test): a last layer's tail is part of the covered function
    return GaussianPredictive(mean.detach(), cov=0.5 * (cov + cov.transpose(1, 2)).detach())
