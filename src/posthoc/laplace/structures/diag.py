"""Diagonal structure: H approximated by its diagonal, Lambda = diag(s h + delta).

Memory P. Fit: one pass; per chunk of examples the squared per-example gradients
(J_n^T s_nk)^2 are summed, layer by layer for Linear/Conv2d networks (see
:func:`posthoc.curvature.jacobians.factor_gradient_squares`), so no (B, K, P)
tensor is held; other networks use per-example VJPs, (b, K, P) per chunk.
The diagonal is exact for shared parameters too (a layer called twice, a
Parameter held by two modules, an embedding tied to the output head, a weight
reused transposed): a covered parameter read more than once per forward
(:func:`posthoc.curvature.jacobians.parameter_uses`) sends the fit and the glm
predictive to the per-example VJP route, whose gradients sum every use.
Posterior algebra is elementwise, O(P). Any prior kind (scalar, per layer,
per parameter).
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from posthoc.curvature.jacobians import DEFAULT_CHUNK_BYTES, factor_gradient_squares, per_example_weighted_grams
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


@register_structure
class DiagCurvature(CurvatureStructure):
    """diag(H) = sum_n sum_k (J_n^T s_nk)^2, (P,), at sigma = 1 and without prior.

    Options of :meth:`fit`: ``chunk_bytes`` (int, default 512 MiB), the working
    memory of one chunk of examples; it bounds the fit and the glm predictive.
    """

    structure = HessianStructure.DIAG
    supports_low_precision = True  # 1 / (s h + delta) per entry: no factorisation kernels needed

    def __init__(self, subset: ParameterSubset, diagonal: torch.Tensor,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        super().__init__(subset)
        self.diagonal = diagonal  # (P,)
        self.chunk_bytes = chunk_bytes

    @classmethod
    def fit(cls, subset: ParameterSubset, batches: Batches, factors: OutputFactors, progress: bool = True,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES, **options: Any) -> "DiagCurvature":
        """One pass over the data; cost per example about K backward passes' worth of per-example gradients."""
        if options:
            raise TypeError(f"hessian_structure='diag' takes only the option chunk_bytes, got {sorted(options)}")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        diagonal = torch.zeros(subset.n_params, dtype=subset.dtype, device=subset.device)
        for inputs, targets in tqdm(batches(), desc="Laplace fit (diag)", disable=not progress, leave=False):
            with torch.no_grad():
                outputs = subset.forward(inputs)
            diagonal += factor_gradient_squares(subset, inputs, factors(outputs, targets), chunk_bytes)
        (diagonal,) = sum_over_ranks([diagonal], "the diag curvature")
        check_curvature_finite(diagonal, "diag")
        return cls(subset, diagonal, chunk_bytes)

    def _precision_diagonal(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """S h + delta, (P,)."""
        return scale * self.diagonal + per_parameter(prior, self.subset)

    def dense_precision(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Lambda = diag(s h + delta), (P, P) (tests and small P only)."""
        return torch.diag(self._precision_diagonal(prior, scale))

    def logdet_precision(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Log det Lambda = sum log(s h + delta): O(P)."""
        return torch.log(self._precision_diagonal(prior, scale)).sum()

    def solve(self, rhs: torch.Tensor, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Lambda^-1 rhs = rhs / (s h + delta) for rhs (P, K): O(PK)."""
        return rhs / self._precision_diagonal(prior, scale).unsqueeze(-1)

    def posterior_variance(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """1 / (s h + delta), (P,)."""
        return 1 / self._precision_diagonal(prior, scale)

    def functional_covariance(self, inputs: ModelInputs, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """J diag(1/(s h + delta)) J^T: (B, C, C), computed in chunks of inputs.

        A diagonal posterior weighs every parameter separately, so the per-example
        Jacobian entries are unavoidable; no (B, C, P) tensor is held at once:
        Linear layers on 2-D inputs use a closed form in g^2 and a^2, Conv2d layers
        one layer's per-example block per chunk, other networks per-example
        Jacobians per chunk (see :func:`per_example_weighted_grams`). Cost about
        C backward passes per input plus, for Conv2d, C weight-gradient products.
        """
        return per_example_weighted_grams(self.subset, inputs, self.posterior_variance(prior, scale), self.chunk_bytes)

    def sample(self, n_samples: int, prior: torch.Tensor, scale: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
        """Offsets from theta* (n_samples, P): standard normals times the posterior standard deviations."""
        std = self.posterior_variance(prior, scale).sqrt()
        eps = torch.randn(n_samples, self.subset.n_params, generator=generator, dtype=std.dtype)
        return eps.to(std.device) * std

    def state_dict(self) -> dict[str, Any]:
        """The fitted diagonal h (P,) and the chunk budget."""
        return {"diagonal": self.diagonal, "chunk_bytes": self.chunk_bytes}

    @classmethod
    def from_state_dict(cls, subset: ParameterSubset, state: dict[str, Any]) -> "DiagCurvature":
        """Inverse of :meth:`state_dict`, on the subset's device and dtype."""
        return cls(subset, state["diagonal"].to(device=subset.device, dtype=subset.dtype),
                   int(state.get("chunk_bytes", DEFAULT_CHUNK_BYTES)))
