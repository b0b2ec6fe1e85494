"""Low-rank structure: the top-k eigenpairs of H plus the prior, Lambda = s U diag(lam) U^T + diag(delta).

Fit, matrix-free: the GGN product v -> sum_n J_n^T S_n S_n^T J_n v (a JVP, then a
VJP: one pass over the examples used) drives ARPACK's Lanczos (scipy eigsh) on a
float64 LinearOperator. Each product is a data pass, so the products run over the
first ``subsample`` examples the batches yield (default: all of them), held in
memory with their output factors S_n (the inputs and S are read once, so a
shuffling loader or Monte-Carlo factors give one fixed operator), and the
estimate is scaled by N / n_sub so that H estimates the full-data sum; N is
counted by reading the rest of the batches once, or given as ``n_data``.
For k >= P - 1 (ARPACK's eigsh needs k < P, and Lanczos is pointless there) H
is built densely from per-example factor gradients of the same cached examples
(as the full structure does) and diagonalised by eigh; that path is for small P.

Eigenpairs whose eigenvalue is not positive to working precision
(lam <= 10 eps sqrt(P) lam_max) are dropped: they are round-off of the PSD H,
and a negative one would make Lambda indefinite. A zero curvature (outputs that
do not depend on the covered weights) keeps no eigenpair: the posterior is the
prior (k = 0).

Posterior algebra with U~ = U diag(c), c = sqrt(s lam) and D = diag(delta)
(any prior kind), through the k x k capacitance K = I + U~^T D^-1 U~ = L L^T:
    log det Lambda = sum log delta + log det K              (matrix determinant lemma)
    Lambda^-1 = D^-1 - Y K^-1 Y^T,  Y = D^-1 U~              (Woodbury)
No P x P matrix is formed; memory P k.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh
from torch.func import vjp, vmap
from tqdm.auto import tqdm

from posthoc.curvature.jacobians import (
    DEFAULT_CHUNK_BYTES,
    jvp_many,
    per_example_factor_gradients,
    per_example_weighted_grams,
    vjp_sum,
)
from posthoc.curvature.output_factors import OutputFactors
from posthoc.distributed import sum_count, sum_over_ranks
from posthoc.laplace.prior import per_parameter
from posthoc.laplace.structures.base import (
    Batches,
    CurvatureStructure,
    HessianStructure,
    check_curvature_finite,
    register_structure,
)
from posthoc.network.subset import ParameterSubset
from posthoc.utils.linalg import cholesky_with_jitter

# Examples x directions per vmapped JVP call in the predictive (bounds the tangent activations held at once).
_JVP_WORK = 4096


class _GGNOperator:
    """v -> (N / n_sub) sum_n J_n^T S_n S_n^T J_n v over cached examples; counts products on a tqdm bar."""

    def __init__(self, subset: ParameterSubset, cached: list[tuple[torch.Tensor, torch.Tensor]], scaling: float,
                 bar: tqdm) -> None:
        self.subset, self.cached, self.scaling, self.bar = subset, cached, scaling, bar
        self.products = 0  # counted here: a disabled tqdm bar does not count

    def matmat(self, directions: torch.Tensor) -> torch.Tensor:
        """H V for V (m, P): (m, P). Cost per example: m JVPs and m VJPs (vmapped over the m directions)."""
        subset = self.subset
        out = torch.zeros_like(directions)
        for inputs, s in self.cached:
            u = jvp_many(subset, inputs, directions)  # (m, b, C)
            w = torch.einsum("bck,bdk,mbd->mbc", s, s, u)
            if directions.shape[0] == 1:
                out[0] += vjp_sum(subset, inputs, w[0])
            else:
                _, pullback = vjp(lambda th: subset.forward(inputs, th), subset.theta_map)
                out += vmap(lambda cot: pullback(cot)[0])(w)
        (out,) = sum_over_ranks([out], "a GGN product")
        self.products += directions.shape[0]
        self.bar.update(directions.shape[0])
        return out * self.scaling

    def numpy_matvec(self, v: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.asarray(v).reshape(-1), dtype=self.subset.dtype, device=self.subset.device)
        return self.matmat(t.unsqueeze(0))[0].to(torch.float64).cpu().numpy()


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
        """Read the subsample once, then run Lanczos: one pass over the subsample per GGN product.

        Cost: about (2 to 3) k products for eigsh's default Krylov size 2k + 1 plus restarts; one pass with
        per-example gradients on the dense path (k >= P - 1). Memory: the cached subsample, its factors (n_sub, C, K) and the Krylov basis
        (P, 2k + 1) in float64.
        """
        if options:
            raise TypeError(f"hessian_structure='lowrank' got unknown options {sorted(options)}; "
                            "it takes rank, subsample, n_data, seed, tol, chunk_bytes")
        n_params = subset.n_params
        if not 1 <= rank <= n_params:
            raise ValueError(f"rank must be in [1, P = {n_params}], got {rank}")
        if subsample is not None and subsample < 1:
            raise ValueError(f"subsample must be >= 1 or None, got {subsample}")
        cached, n_seen = cls._read(subset, batches, factors, subsample, stop_early=n_data is not None)
        # under torch.distributed each rank caches up to `subsample` of its shard; counts are totals
        n_sub = sum_count(sum(x.shape[0] for x, _ in cached), "the subsample size")
        n_seen = sum_count(n_seen, "the number of training examples")
        if n_sub == 0:
            raise ValueError("the training data is empty; lowrank fit needs at least one example")
        n_total = n_seen if n_data is None else n_data
        if n_total < n_sub:
            raise ValueError(f"n_data = {n_data} is smaller than the {n_sub} examples read")
        scaling = n_total / n_sub

        with tqdm(desc="Laplace fit (lowrank): GGN products", disable=not progress, leave=False) as bar:
            operator = _GGNOperator(subset, cached, scaling, bar)
            if rank >= n_params - 1:
                evals, evecs = cls._dense_eigenpairs(operator, n_params, subset)
            else:
                evals, evecs = cls._lanczos(operator, n_params, rank, seed, tol, subset.dtype)
            n_products = operator.products
        evals, evecs = evals[:rank], evecs[:, :rank]
        check_curvature_finite(evals, "lowrank")
        check_curvature_finite(evecs, "lowrank")
        eps = torch.finfo(subset.dtype).eps
        largest = evals.max().clamp_min(0) if evals.numel() else evals.new_zeros(())
        keep = evals > 10 * eps * math.sqrt(n_params) * largest
        info = {"rank_requested": rank, "n_sub": n_sub, "n_data": n_total, "seed": seed, "products": n_products}
        return cls(subset, evecs[:, keep].contiguous(), evals[keep].contiguous(), info, chunk_bytes)

    @staticmethod
    def _read(subset: ParameterSubset, batches: Batches, factors: OutputFactors, subsample: int | None,
              stop_early: bool) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """The first ``subsample`` examples with their factors S, and the number of examples seen."""
        cached: list[tuple[torch.Tensor, torch.Tensor]] = []
        n_cached = n_seen = 0
        for inputs, targets in batches():
            n_seen += inputs.shape[0]
            room = inputs.shape[0] if subsample is None else min(inputs.shape[0], subsample - n_cached)
            if room > 0:
                x, y = inputs[:room], targets[:room]
                with torch.no_grad():
                    s = factors(subset.forward(x), y)
                cached.append((x, s))
                n_cached += room
            elif stop_early:
                break
        return cached, n_seen

    @staticmethod
    def _dense_eigenpairs(operator: _GGNOperator, n_params: int,
                          subset: ParameterSubset) -> tuple[torch.Tensor, torch.Tensor]:
        """All eigenpairs, descending, of the dense H = scaling * sum_n (J_n^T S_n)(J_n^T S_n)^T (small P only).

        Built from per-example factor gradients like the full structure (one pass, B K P per batch), which for
        small P is much cheaper than P operator products.
        """
        hessian = torch.zeros(n_params, n_params, dtype=subset.dtype, device=subset.device)
        for inputs, s in operator.cached:
            grads = per_example_factor_gradients(subset, inputs, s).reshape(-1, n_params)
            hessian += grads.T @ grads
        (hessian,) = sum_over_ranks([hessian], "the low-rank curvature (dense path)")
        evals, evecs = torch.linalg.eigh(hessian * operator.scaling)
        return evals.flip(0), evecs.flip(1)

    @staticmethod
    def _lanczos(operator: _GGNOperator, n_params: int, rank: int, seed: int, tol: float | None,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``rank`` eigenpairs by ARPACK Lanczos on a float64 operator, descending."""
        if tol is None:
            tol = 1e-10 if dtype == torch.float64 else 1e-5
        linop = LinearOperator((n_params, n_params), matvec=operator.numpy_matvec, dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(n_params)
        device = operator.subset.device
        try:
            evals, evecs = eigsh(linop, k=rank, which="LA", v0=v0, tol=tol)
        except ArpackError as err:
            # ARPACK stops on an exactly zero operator (its Krylov start vector H v0 vanishes)
            if np.any(operator.numpy_matvec(v0)):
                raise RuntimeError(f"Lanczos (ARPACK) failed on the GGN operator: {err}; try another seed, a larger "
                                   "tol or a smaller rank") from err
            return (torch.zeros(0, dtype=dtype, device=device),
                    torch.zeros(n_params, 0, dtype=dtype, device=device))
        order = np.argsort(evals)[::-1].copy()
        return (torch.as_tensor(evals[order], dtype=dtype, device=device),
                torch.as_tensor(evecs[:, order], dtype=dtype, device=device))

    # --- posterior algebra -----------------------------------------------------------------------------------

    def _factors(self, prior: torch.Tensor, scale: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """delta (P,), c = sqrt(s lam) (k,), D^-1 U (P, k) and the Cholesky factor L of K (k, k)."""
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
