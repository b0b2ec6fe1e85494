"""Full structure: the dense P x P curvature. For small networks and last layers.

Memory P^2; fit costs one pass with per-example Jacobians (B*C*P per batch).
With a scalar prior the posterior algebra uses the eigendecomposition of H,
computed once (O(P^3)), so every later (delta, sigma) costs O(P) for the
log-determinant: marginal-likelihood tuning never refactorises. Per-layer and
per-parameter priors use a Cholesky of Lambda, O(P^3) per new (delta, sigma).
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from posthoc.curvature.jacobians import per_example_factor_gradients, per_example_jacobians
from posthoc.curvature.output_factors import OutputFactors
from posthoc.distributed import sum_over_ranks
from posthoc.laplace.prior import per_parameter
from posthoc.laplace.structures.base import (
    Batches,
    CurvatureStructure,
    HessianStructure,
    check_curvature_finite,
    register_structure,
)
from posthoc.network.inputs import ModelInputs
from posthoc.network.subset import ParameterSubset
from posthoc.utils.linalg import cholesky_with_jitter, psd_eigh


@register_structure
class FullCurvature(CurvatureStructure):
    """The dense GGN H (P, P): exact, O(P^2) memory and O(P^3) factorisations; small P only."""

    structure = HessianStructure.FULL

    def __init__(self, subset: ParameterSubset, hessian: torch.Tensor) -> None:
        super().__init__(subset)
        self.hessian = hessian  # (P, P) at sigma = 1, without prior
        self._eigen: tuple[torch.Tensor, torch.Tensor] | None = None

    def _eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigenvalues (P,), eigenvectors (P, P)) of H, clamped at 0, computed once."""
        if self._eigen is None:
            self._eigen = psd_eigh(self.hessian)
        return self._eigen

    def _scalar_spectrum(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
        """Eigenvalues s * lambda + delta of Lambda when the prior is scalar, else None."""
        if prior.numel() != 1:
            return None
        evals, _ = self._eigh()
        return scale * evals + prior.reshape(())

    @classmethod
    def fit(cls, subset: ParameterSubset, batches: Batches, factors: OutputFactors, progress: bool = True,
            **options: Any) -> "FullCurvature":
        """H = sum_n (J_n^T S_n)(J_n^T S_n)^T from per-example factor gradients: one pass, B K P per batch."""
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
        (hessian,) = sum_over_ranks([hessian], "the full curvature")
        check_curvature_finite(hessian, "full")
        return cls(subset, hessian)

    def largest_eigenvalue(self) -> torch.Tensor:
        """lambda_max(H): float32 loses the directions with s * lambda << eps * lambda_max.

        The eigendecomposition of H in float32 is off by about eps * lambda_max in every eigenvalue, so those
        directions get 1 / (round-off + delta) as variance. Cost: the O(P^3) eigendecomposition, once (the scalar-prior algebra reuses it).
        """
        return self._eigh()[0].max()

    def dense_precision(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Lambda = s H + diag(delta), (P, P)."""
        return scale * self.hessian + torch.diag(per_parameter(prior, self.subset))

    def _cholesky(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return cholesky_with_jitter(self.dense_precision(prior, scale), "full posterior precision")

    def logdet_precision(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Log det Lambda: from H's spectrum for a scalar prior, else by Cholesky (O(P^3))."""
        spectrum = self._scalar_spectrum(prior, scale)
        if spectrum is not None:
            return torch.log(spectrum).sum()
        return 2 * torch.log(torch.diagonal(self._cholesky(prior, scale))).sum()

    def functional_covariance(self, inputs: ModelInputs, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """J Lambda^-1 J^T (B, C, C) from per-example Jacobians (B, C, P): C backward passes per example."""
        jac = per_example_jacobians(self.subset, inputs)  # (B, C, P)
        spectrum = self._scalar_spectrum(prior, scale)
        if spectrum is not None:
            rotated = jac @ self._eigh()[1]  # (B, C, P) in the eigenbasis of H
            return (rotated / spectrum) @ rotated.transpose(1, 2)
        chol = self._cholesky(prior, scale)
        batch, n_out, n_params = jac.shape
        # one solve against all B*C Jacobian rows (a batched solve would copy L per example)
        white = torch.linalg.solve_triangular(chol, jac.reshape(-1, n_params).T, upper=False)  # (P, B*C)
        white = white.T.reshape(batch, n_out, n_params)
        return white @ white.transpose(1, 2)

    def sample(self, n_samples: int, prior: torch.Tensor, scale: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
        """Offsets from theta* (n_samples, P) ~ N(0, Lambda^-1)."""
        spectrum = self._scalar_spectrum(prior, scale)
        if spectrum is not None:
            eps = torch.randn(n_samples, self.subset.n_params, generator=generator, dtype=spectrum.dtype)
            return (eps.to(spectrum.device) * spectrum.rsqrt()) @ self._eigh()[1].T
        chol = self._cholesky(prior, scale)
        eps = torch.randn(self.subset.n_params, n_samples, generator=generator, dtype=chol.dtype)
        # Lambda = L L^T, so L^-T eps ~ N(0, Lambda^-1)
        return torch.linalg.solve_triangular(chol.T, eps.to(chol.device), upper=True).T

    def posterior_variance(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """diag(Lambda^-1), (P,)."""
        spectrum = self._scalar_spectrum(prior, scale)
        if spectrum is not None:
            return (self._eigh()[1] ** 2) @ (1.0 / spectrum)
        return torch.diagonal(torch.cholesky_inverse(self._cholesky(prior, scale)))

    def state_dict(self) -> dict[str, Any]:
        """The fitted H (P, P)."""
        return {"hessian": self.hessian}

    @classmethod
    def from_state_dict(cls, subset: ParameterSubset, state: dict[str, Any]) -> "FullCurvature":
        """Inverse of :meth:`state_dict`, on the subset's device and dtype."""
        return cls(subset, state["hessian"].to(device=subset.device, dtype=subset.dtype))
