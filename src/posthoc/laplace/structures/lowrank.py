"""Low-rank structure: the top-k eigenpairs of H plus the prior, Lambda = s U diag(lam) U^T + diag(delta).

Fit, matrix-free: the top-k eigenpairs of the GGN by Lanczos on the matrix-free
GGN operator, over the first ``subsample`` examples and scaled to the full data
(or densely for k >= P - 1), as :func:`posthoc.curvature.ggn_operator.top_ggn_eigenpairs`
computes them. Eigenpairs not positive to working precision are dropped (a
negative one would make Lambda indefinite); a zero curvature keeps no eigenpair:
the posterior is the prior (k = 0).

Posterior algebra with U~ = U diag(c), c = sqrt(s lam) and D = diag(delta)
(any prior kind), through the k x k capacitance K = I + U~^T D^-1 U~ = L L^T:
    log det Lambda = sum log delta + log det K              (matrix determinant lemma)
    Lambda^-1 = D^-1 - Y K^-1 Y^T,  Y = D^-1 U~              (Woodbury)
No P x P matrix is formed; memory P k.
"""

from __future__ import annotations

from typing import Any

import torch

from posthoc.curvature.ggn_operator import top_ggn_eigenpairs
from posthoc.curvature.jacobians import DEFAULT_CHUNK_BYTES, jvp_many, per_example_weighted_grams
from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.prior import per_parameter
from posthoc.laplace.structures.base import (
    Batches,
    CurvatureStructure,
    HessianStructure,
    register_structure,
)
from posthoc.network.subset import ParameterSubset
from posthoc.utils.linalg import cholesky_with_jitter

# Examples x directions per vmapped JVP call in the predictive (bounds the tangent activations held at once).
_JVP_WORK = 4096


@register_structure
class LowRankCurvature(CurvatureStructure):
    """H ~ U diag(lam) U^T with U (P, k) orthonormal and lam (k,) > 0, at sigma = 1 and without prior.

    Options of :meth:`fit`:
        rank: k, number of eigenpairs (default 20).
        subsample: number of examples the GGN products use (default None: all); under torch.distributed,
            per rank (each rank caches up to this many of its shard).
        n_data: total number of training examples N, if known (saves the counting pass).
        seed: seed of Lanczos' start vector (default 0).
        tol: relative accuracy of the eigenvalues passed to eigsh (default 1e-10 in float64,
            1e-5 in float32 models, whose products carry float32 round-off).
        chunk_bytes: working memory of one chunk in the glm predictive (default 512 MiB).
    """

    structure = HessianStructure.LOWRANK

    def __init__(self, subset: ParameterSubset, eigenvectors: torch.Tensor, eigenvalues: torch.Tensor,
                 info: dict[str, Any] | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        super().__init__(subset)
        self.eigenvectors = eigenvectors  # U (P, k)
        self.eigenvalues = eigenvalues  # lam (k,)
        self.info = dict(info or {})  # rank asked, n_sub, n_data, products: provenance, not needed for the algebra
        self.chunk_bytes = chunk_bytes

    @property
    def rank(self) -> int:
        return self.eigenvalues.numel()

    @classmethod
    def fit(cls, subset: ParameterSubset, batches: Batches, factors: OutputFactors, progress: bool = True,
            rank: int = 20, subsample: int | None = None, n_data: int | None = None, seed: int = 0,
            tol: float | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES, **options: Any) -> "LowRankCurvature":
        """Top-``rank`` GGN eigenpairs by Lanczos on the matrix-free GGN operator (one pass over the subsample
        per product; see :func:`posthoc.curvature.ggn_operator.top_ggn_eigenpairs` for the cost and errors).
        """
        if options:
            raise TypeError(f"hessian_structure='lowrank' got unknown options {sorted(options)}; "
                            "it takes rank, subsample, n_data, seed, tol, chunk_bytes")
        pairs = top_ggn_eigenpairs(subset, batches, factors, rank, subsample=subsample, n_data=n_data, seed=seed,
                                   tol=tol, progress=progress, what="lowrank",
                                   desc="Laplace fit (lowrank): GGN products")
        return cls(subset, pairs.eigenvectors, pairs.eigenvalues, pairs.info, chunk_bytes)

    # --- posterior algebra -----------------------------------------------------------------------------------

    def _factors(self, prior: torch.Tensor, scale: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Delta (P,), c = sqrt(s lam) (k,), D^-1 U (P, k) and the Cholesky factor L of K (k, k)."""
        delta = per_parameter(prior, self.subset)
        c = torch.sqrt(scale * self.eigenvalues)
        dinv_u = self.eigenvectors / delta.unsqueeze(-1)
        capacitance = torch.eye(self.rank, dtype=dinv_u.dtype, device=dinv_u.device) + \
            c.unsqueeze(-1) * (self.eigenvectors.T @ dinv_u) * c
        return delta, c, dinv_u, cholesky_with_jitter(capacitance, "lowrank capacitance")

    def dense_precision(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        u = self.eigenvectors
        return scale * (u * self.eigenvalues) @ u.T + torch.diag(per_parameter(prior, self.subset))

    def logdet_precision(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        delta, _, _, chol = self._factors(prior, scale)
        return torch.log(delta).sum() + 2 * torch.log(torch.diagonal(chol)).sum()

    def posterior_variance(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """1/delta - rowsum((Y L^-T)^2), O(P k^2)."""
        delta, c, dinv_u, chol = self._factors(prior, scale)
        white = torch.linalg.solve_triangular(chol, (dinv_u * c).T, upper=False)  # L^-1 Y^T, (k, P)
        return 1 / delta - white.square().sum(0)

    def functional_covariance(self, inputs: torch.Tensor, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """J D^-1 J^T - (J Y) K^-1 (J Y)^T: (B, C, C).

        J Y = (J D^-1 U) diag(c) takes k JVPs per input (vmapped, in chunks). J D^-1 J^T is the glm covariance
        of the diagonal prior and needs per-example gradients (chunked; Linear layers by a closed form, see
        :func:`posthoc.curvature.jacobians.per_example_weighted_grams`). Nothing P x P or (B, C, P) is held.
        """
        delta, c, dinv_u, chol = self._factors(prior, scale)
        prior_part = per_example_weighted_grams(self.subset, inputs, 1 / delta, self.chunk_bytes)
        if self.rank == 0:  # zero curvature: the prior's covariance
            return prior_part
        step = max(1, _JVP_WORK // self.rank)
        jy = torch.cat([jvp_many(self.subset, inputs[i:i + step], dinv_u.T) for i in range(0, inputs.shape[0], step)],
                       dim=1)  # (k, B, C)
        jy = jy.permute(1, 0, 2) * c.unsqueeze(-1)  # (B, k, C)
        white = torch.linalg.solve_triangular(chol, jy, upper=False)  # L^-1 (J Y)^T, (B, k, C)
        return prior_part - white.transpose(1, 2) @ white

    def sample(self, n_samples: int, prior: torch.Tensor, scale: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
        """D^-1/2 T eps with T = (I + W W^T)^-1/2, W = D^-1/2 U~ (P, k): O(P k n) per draw set.

        With W^T W = R diag(sig^2) R^T, T = I - W R diag(g) R^T W^T, g = 1/(r (1 + r)), r = sqrt(1 + sig^2),
        which is smooth at sig = 0 (no division by small singular values).
        """
        delta = per_parameter(prior, self.subset)
        dsqrt = delta.sqrt()
        w = self.eigenvectors * torch.sqrt(scale * self.eigenvalues) / dsqrt.unsqueeze(-1)
        sig2, rot = torch.linalg.eigh(w.T @ w)
        r = torch.sqrt(1 + sig2.clamp_min(0))
        g = 1 / (r * (1 + r))
        eps = torch.randn(self.subset.n_params, n_samples, generator=generator, dtype=w.dtype).to(w.device)
        t_eps = eps - w @ (rot @ (g.unsqueeze(-1) * (rot.T @ (w.T @ eps))))
        return (t_eps / dsqrt.unsqueeze(-1)).T

    def state_dict(self) -> dict[str, Any]:
        return {"eigenvectors": self.eigenvectors, "eigenvalues": self.eigenvalues, "info": dict(self.info),
                "chunk_bytes": self.chunk_bytes}

    @classmethod
    def from_state_dict(cls, subset: ParameterSubset, state: dict[str, Any]) -> "LowRankCurvature":
        def load(key: str) -> torch.Tensor:
            return state[key].to(device=subset.device, dtype=subset.dtype)

        return cls(subset, load("eigenvectors"), load("eigenvalues"), state.get("info"),
                   int(state.get("chunk_bytes", DEFAULT_CHUNK_BYTES)))
