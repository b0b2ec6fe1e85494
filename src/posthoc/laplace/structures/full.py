"""Full structure: the dense P x P curvature. For small networks and last layers.

Memory P^2; fit costs one pass with per-example Jacobians (B*C*P per batch);
posterior algebra is a Cholesky of Lambda, O(P^3).
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from posthoc.curvature.jacobians import per_example_factor_gradients, per_example_jacobians
from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.prior import per_parameter
from posthoc.laplace.structures.base import (
    Batches,
    CurvatureStructure,
    HessianStructure,
    check_curvature_finite,
    register_structure,
)
from posthoc.laplace.subset import ParameterSubset
from posthoc.utils.linalg import cholesky_with_jitter


@register_structure
class FullCurvature(CurvatureStructure):
    structure = HessianStructure.FULL

    def __init__(self, subset: ParameterSubset, hessian: torch.Tensor) -> None:
        super().__init__(subset)
        self.hessian = hessian  # (P, P) at sigma = 1, without prior

    @classmethod
    def fit(cls, subset: ParameterSubset, batches: Batches, factors: OutputFactors, progress: bool = True,
            **options: Any) -> "FullCurvature":
        if options:
            raise TypeError(f"hessian_structure='full' takes no options, got {sorted(options)}")
        n = subset.n_params
        hessian = torch.zeros(n, n, dtype=subset.dtype, device=subset.device)
        for inputs, targets in tqdm(batches(), desc="Laplace fit (full)", disable=not progress, leave=False):
            with torch.no_grad():
                outputs = subset.forward(inputs)
            s = factors(outputs, targets)
            grads = per_example_factor_gradients(subset, inputs, s).reshape(-1, n)  # (B*K, P)
            hessian += grads.T @ grads
        check_curvature_finite(hessian, "full")
        return cls(subset, hessian)

    def dense_precision(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return scale * self.hessian + torch.diag(per_parameter(prior, self.subset))

    def _cholesky(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return cholesky_with_jitter(self.dense_precision(prior, scale), "full posterior precision")

    def logdet_precision(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return 2 * torch.log(torch.diagonal(self._cholesky(prior, scale))).sum()

    def functional_covariance(self, inputs: torch.Tensor, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        jac = per_example_jacobians(self.subset, inputs)  # (B, C, P)
        chol = self._cholesky(prior, scale)
        white = torch.linalg.solve_triangular(chol, jac.transpose(1, 2), upper=False)  # (B, P, C)
        return white.transpose(1, 2) @ white

    def sample(self, n_samples: int, prior: torch.Tensor, scale: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
        chol = self._cholesky(prior, scale)
        eps = torch.randn(self.subset.n_params, n_samples, generator=generator, dtype=chol.dtype)
        # Lambda = L L^T, so L^-T eps ~ N(0, Lambda^-1)
        return torch.linalg.solve_triangular(chol.T, eps.to(chol.device), upper=True).T

    def posterior_variance(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.diagonal(torch.cholesky_inverse(self._cholesky(prior, scale)))

    def state_dict(self) -> dict[str, Any]:
        return {"hessian": self.hessian}

    @classmethod
    def from_state_dict(cls, subset: ParameterSubset, state: dict[str, Any]) -> "FullCurvature":
        return cls(subset, state["hessian"].to(device=subset.device, dtype=subset.dtype))
