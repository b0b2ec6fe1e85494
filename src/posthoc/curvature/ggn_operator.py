"""The matrix-free GGN operator and its top eigenpairs by Lanczos.

The GGN product v -> sum_n J_n^T S_n S_n^T J_n v (a JVP, then a VJP: one pass
over the examples used) drives ARPACK's Lanczos (scipy eigsh) on a float64
LinearOperator. Each product is a data pass, so the products run over the first
``subsample`` examples the batches yield (default: all of them), held in memory
with their output factors S_n (the inputs and S are read once, so a shuffling
loader or Monte-Carlo factors give one fixed operator), and the estimate is
scaled by N / n_sub so that H estimates the full-data sum; N is counted by
reading the rest of the batches once, or given as ``n_data``. For k >= P - 1
(ARPACK's eigsh needs k < P, and Lanczos is pointless there) H is built densely
from per-example factor gradients of the same cached examples and diagonalised
by eigh; that path is for small P.

Eigenpairs whose eigenvalue is not positive to working precision
(lam <= 10 eps sqrt(P) lam_max) are dropped: they are round-off of the PSD H.
A zero curvature (outputs that do not depend on the covered weights) keeps no
eigenpair.

Used by the low-rank Laplace structure and by ScaLLA's "eigen" directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh
from torch.func import vjp, vmap
from tqdm.auto import tqdm

from posthoc.curvature.checks import check_curvature_finite
from posthoc.curvature.jacobians import jvp_many, per_example_factor_gradients, vjp_sum
from posthoc.curvature.output_factors import OutputFactors
from posthoc.distributed import sum_count, sum_over_ranks
from posthoc.network.inputs import ModelInputs, batch_size, take
from posthoc.network.subset import ParameterSubset

Batches = Callable[[], Iterable[tuple[ModelInputs, torch.Tensor]]]
CachedExamples = list[tuple[ModelInputs, torch.Tensor]]


class GGNOperator:
    """v -> (N / n_sub) sum_n J_n^T S_n S_n^T J_n v over cached examples; counts products on a tqdm bar.

    ``cached`` holds (inputs (b, ...), S (b, C, K)) pairs; under torch.distributed each product is summed
    over ranks. ``products`` counts the directions multiplied so far.
    """

    def __init__(self, subset: ParameterSubset, cached: CachedExamples, scaling: float, bar: tqdm) -> None:
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
                pullback = vjp(lambda th, x=inputs: subset.forward(x, th), subset.theta_map)[1]
                out += vmap(lambda cot, pull=pullback: pull(cot)[0])(w)
        (out,) = sum_over_ranks([out], "a GGN product")
        self.products += directions.shape[0]
        self.bar.update(directions.shape[0])
        return out * self.scaling

    def numpy_matvec(self, v: np.ndarray) -> np.ndarray:
        """H v for a float64 numpy vector (P,), as ARPACK calls it."""
        t = torch.as_tensor(np.asarray(v).reshape(-1), dtype=self.subset.dtype, device=self.subset.device)
        return self.matmat(t.unsqueeze(0))[0].to(torch.float64).cpu().numpy()


@dataclass
class GGNEigenpairs:
    """Top eigenpairs of the GGN H ~ U diag(lam) U^T: eigenvalues (k,) > 0 descending, eigenvectors U (P, k).

    ``info`` records the rank asked, n_sub, n_data, the seed and the number of GGN products.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def read_subsample(subset: ParameterSubset, batches: Batches, factors: OutputFactors, subsample: int | None,
                   stop_early: bool) -> tuple[CachedExamples, int]:
    """The first ``subsample`` examples with their factors S (b, C, K), and the number of examples seen.

    With ``stop_early`` the reading stops once the subsample is full (N is known); otherwise every batch is
    read once to count N.
    """
    cached: CachedExamples = []
    n_cached = n_seen = 0
    for inputs, targets in batches():
        size = batch_size(inputs)
        n_seen += size
        room = size if subsample is None else min(size, subsample - n_cached)
        if room > 0:
            x, y = take(inputs, 0, room), targets[:room]
            with torch.no_grad():
                s = factors(subset.forward(x), y)
            cached.append((x, s))
            n_cached += room
        elif stop_early:
            break
    return cached, n_seen


def dense_eigenpairs(operator: GGNOperator, n_params: int,
                     subset: ParameterSubset) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenpairs, descending, of the dense H = scaling * sum_n (J_n^T S_n)(J_n^T S_n)^T (small P only).

    Built from per-example factor gradients like the full structure (one pass, B K P per batch), which for
    small P is much cheaper than P operator products. Memory: P x P.
    """
    hessian = torch.zeros(n_params, n_params, dtype=subset.dtype, device=subset.device)
    for inputs, s in operator.cached:
        grads = per_example_factor_gradients(subset, inputs, s).reshape(-1, n_params)
        hessian += grads.T @ grads
    (hessian,) = sum_over_ranks([hessian], "the low-rank curvature (dense path)")
    evals, evecs = torch.linalg.eigh(hessian * operator.scaling)
    return evals.flip(0), evecs.flip(1)


def lanczos_eigenpairs(operator: GGNOperator, n_params: int, rank: int, seed: int, tol: float | None,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs (rank,), (P, rank) by ARPACK Lanczos on a float64 operator, descending.

    ``tol`` defaults to 1e-10 in float64 and 1e-5 otherwise. An exactly zero operator gives no eigenpair.

    Raises:
        RuntimeError: ARPACK failed on a nonzero operator.
    """
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


def top_ggn_eigenpairs(subset: ParameterSubset, batches: Batches, factors: OutputFactors, rank: int,
                       subsample: int | None = None, n_data: int | None = None, seed: int = 0,
                       tol: float | None = None, progress: bool = True, what: str = "GGN",
                       desc: str = "GGN products (Lanczos)") -> GGNEigenpairs:
    """The top-``rank`` eigenpairs of the GGN of ``subset``'s outputs over ``batches`` (see the module docstring).

    Args:
        subset: the covered weights (P = ``subset.n_params``).
        batches: a callable returning a fresh iterator of (inputs, targets); inputs are the covered module's.
        factors: the output factors S_n.
        rank: k in [1, P].
        subsample: number of examples the products use (default None: all); under torch.distributed, per rank.
        n_data: total number of examples N, if known (saves the counting pass).
        seed: seed of Lanczos' start vector.
        tol: relative accuracy of the eigenvalues passed to eigsh (default 1e-10 in float64, 1e-5 in float32).
        progress: show a tqdm bar counting the products, labelled ``desc``.
        desc: the progress bar's label.
        what: the curvature's name in the NaN/Inf error.

    Cost: about (2 to 3) k products for eigsh's default Krylov size 2k + 1 plus restarts, one pass over the
    cached subsample each; one pass with per-example gradients on the dense path (k >= P - 1). Memory: the
    cached subsample, its factors (n_sub, C, K) and the Krylov basis (P, 2k + 1) in float64.

    Raises:
        ValueError: rank outside [1, P]; subsample < 1; no training example; n_data below the examples read.
        FloatingPointError: NaN/Inf in the eigenpairs.
        RuntimeError: ARPACK failed.
    """
    n_params = subset.n_params
    if not 1 <= rank <= n_params:
        raise ValueError(f"rank must be in [1, P = {n_params}], got {rank}")
    if subsample is not None and subsample < 1:
        raise ValueError(f"subsample must be >= 1 or None, got {subsample}")
    cached, n_seen = read_subsample(subset, batches, factors, subsample, stop_early=n_data is not None)
    # under torch.distributed each rank caches up to `subsample` of its shard; counts are totals
    n_sub = sum_count(sum(batch_size(x) for x, _ in cached), "the subsample size")
    n_seen = sum_count(n_seen, "the number of training examples")
    if n_sub == 0:
        raise ValueError("the training data is empty; lowrank fit needs at least one example")
    n_total = n_seen if n_data is None else n_data
    if n_total < n_sub:
        raise ValueError(f"n_data = {n_data} is smaller than the {n_sub} examples read")
    scaling = n_total / n_sub

    with tqdm(desc=desc, disable=not progress, leave=False) as bar:
        operator = GGNOperator(subset, cached, scaling, bar)
        if rank >= n_params - 1:
            evals, evecs = dense_eigenpairs(operator, n_params, subset)
        else:
            evals, evecs = lanczos_eigenpairs(operator, n_params, rank, seed, tol, subset.dtype)
        n_products = operator.products
    evals, evecs = evals[:rank], evecs[:, :rank]
    check_curvature_finite(evals, what)
    check_curvature_finite(evecs, what)
    eps = torch.finfo(subset.dtype).eps
    largest = evals.max().clamp_min(0) if evals.numel() else evals.new_zeros(())
    keep = evals > 10 * eps * math.sqrt(n_params) * largest
    info = {"rank_requested": rank, "n_sub": n_sub, "n_data": n_total, "seed": seed, "products": n_products}
    return GGNEigenpairs(evals[keep].contiguous(), evecs[:, keep].contiguous(), info)
