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

The same eigenpairs without a P-sized basis (:func:`streamed_ggn_eigenpairs`): H = s A^T A with A (n K, P)
stacking the rows S_n^T J_n of the n cached examples, so Lanczos can run on the Gram matrix G = s A A^T
(n K, n K), which has H's nonzero eigenvalues, at the same cost per product (a VJP, then a JVP); an
eigenvector w of G gives H's u = A^T w sqrt(s / lam), rebuilt a few at a time by one backward pass over the
cached examples. Its basis is (n K, 2k + 1) instead of (P, 2k + 1) float64.

Used by the low-rank Laplace structure (stored eigenvectors) and by ScaLLA's "eigen" directions (streamed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Union

import numpy as np
import torch
from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh
from torch.func import vjp, vmap
from tqdm.auto import tqdm

from posthoc.curvature.checks import check_curvature_finite
from posthoc.curvature.jacobians import jvp_many, per_example_factor_gradients, vjp_sum
from posthoc.curvature.output_factors import OutputFactors
from posthoc.distributed import gather_rows, is_distributed, sum_count, sum_over_ranks
from posthoc.distributed import rank as rank_of_process
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


def lanczos_eigenpairs(operator: Union[GGNOperator, "DualGGNOperator"], n_params: int, rank: int, seed: int, tol: float | None,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs (rank,), (P, rank) by ARPACK Lanczos on a float64 operator, descending.

    ``operator`` is H (P = ``n_params``) or the dual G (``n_params`` its dimension n K). ``tol`` defaults to 1e-10 in float64 and 1e-5 otherwise. An exactly zero operator gives no eigenpair.

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


def cached_subsample(subset: ParameterSubset, batches: Batches, factors: OutputFactors, rank: int,
                     subsample: int | None, n_data: int | None) -> tuple[CachedExamples, int, int]:
    """The checked arguments' cached subsample (see :func:`read_subsample`), its size n_sub and N (totals over ranks).

    Raises:
        ValueError: rank outside [1, P]; subsample < 1; no training example; n_data below the examples read.
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
    return cached, n_sub, n_total


def positive_eigenvalues(evals: torch.Tensor, n_params: int) -> torch.Tensor:
    """Mask (k,) of the eigenvalues above round-off of a PSD operator: lam > 10 eps sqrt(P) max(lam_max, 0)."""
    eps = torch.finfo(evals.dtype).eps
    largest = evals.max().clamp_min(0) if evals.numel() else evals.new_zeros(())
    return evals > 10 * eps * math.sqrt(n_params) * largest


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
    cached, n_sub, n_total = cached_subsample(subset, batches, factors, rank, subsample, n_data)
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
    keep = positive_eigenvalues(evals, n_params)
    info = {"rank_requested": rank, "n_sub": n_sub, "n_data": n_total, "seed": seed, "products": n_products}
    return GGNEigenpairs(evals[keep].contiguous(), evecs[:, keep].contiguous(), info)


class DualGGNOperator:
    """w -> G w for the Gram matrix G = scaling * A A^T (n K, n K) of the GGN H = scaling * A^T A (P, P).

    A (n K, P) stacks the rows S_n^T J_n of the n cached examples (K factor columns each): G has H's nonzero
    eigenvalues, and a unit eigenvector w of G gives H's unit eigenvector u = A^T w sqrt(scaling / lam). Dual
    vectors index the examples of every rank in rank order; each rank holds the examples of its rows, so a
    product is one local backward pass (A^T w, summed over ranks), then one local forward-mode pass (A u,
    gathered over ranks): the cost of a GGN product, with no P-vector kept beyond the one in flight.
    """

    def __init__(self, subset: ParameterSubset, cached: CachedExamples, scaling: float, bar: tqdm) -> None:
        self.subset, self.cached, self.scaling, self.bar = subset, cached, scaling, bar
        self.products = 0
        n_local = sum(s.shape[0] * s.shape[2] for _, s in cached)
        sizes = gather_rows(torch.tensor([n_local], device=subset.device), "the GGN's dual dimension").tolist()
        self.start = sum(sizes[:rank_of_process()]) if is_distributed() else 0
        self.n_local, self.n_dual = n_local, sum(sizes)

    def pull(self, coefficients: torch.Tensor) -> torch.Tensor:
        """A^T W for this rank's rows W (m, n_local), summed over ranks: (m, P).

        Cost: one forward and m backward passes per cached batch. Memory: the output and about two P-vectors (the
        m backward passes run one after another: vmapped, each held m P-sized gradients at once).
        """
        subset = self.subset
        out = coefficients.new_zeros(coefficients.shape[0], subset.n_params)
        start = 0
        for inputs, s in self.cached:
            rows = s.shape[0] * s.shape[2]
            cotangents = torch.einsum("bck,mbk->mbc", s, coefficients[:, start:start + rows].reshape(
                -1, s.shape[0], s.shape[2]))
            start += rows
            pullback = vjp(lambda th, x=inputs: subset.forward(x, th), subset.theta_map)[1]
            for row, cotangent in zip(out, cotangents, strict=True):
                row += pullback(cotangent)[0]
        (out,) = sum_over_ranks([out], "a GGN product (dual)")
        return out

    def push(self, vectors: torch.Tensor) -> torch.Tensor:
        """A V for V (m, P): this rank's rows (m, n_local). Cost: m forward-mode passes per example (vmapped)."""
        parts = [torch.einsum("bck,mbc->mbk", s, jvp_many(self.subset, inputs, vectors)).reshape(len(vectors), -1)
                 for inputs, s in self.cached]
        return torch.cat(parts, dim=1) if parts else vectors.new_zeros(len(vectors), 0)

    def matmat(self, coefficients: torch.Tensor) -> torch.Tensor:
        """G W for W (m, n K) in every rank's example order: (m, n K). Cost: one pull and one push."""
        local = coefficients[:, self.start:self.start + self.n_local]
        out = self.push(self.pull(local))
        out = gather_rows(out.T.contiguous(), "a GGN product (dual)").T
        self.products += coefficients.shape[0]
        self.bar.update(coefficients.shape[0])
        return out * self.scaling

    def numpy_matvec(self, w: np.ndarray) -> np.ndarray:
        """G w for a float64 numpy vector (n K,), as ARPACK calls it."""
        t = torch.as_tensor(np.asarray(w).reshape(-1), dtype=self.subset.dtype, device=self.subset.device)
        return self.matmat(t.unsqueeze(0))[0].to(torch.float64).cpu().numpy()


class StreamedGGNEigenpairs:
    """Top GGN eigenpairs whose eigenvectors are not stored but rebuilt a few at a time from the cached examples.

    ``eigenvalues`` (k,) > 0 descending; the eigenvectors u_i = A^T w_i sqrt(scaling / lam_i) (P,) come from the
    dual eigenvectors w_i (this rank's rows of W (n_local, k)) through :meth:`chunks`, one backward pass over the
    cached examples per chunk of eigenvectors. ``info`` as :class:`GGNEigenpairs`'.
    Memory: the cached examples and W; a chunk of ``size`` P-vectors while it is in use.
    """

    def __init__(self, eigenvalues: torch.Tensor, coefficients: torch.Tensor, operator: DualGGNOperator,
                 info: dict[str, Any]) -> None:
        self.eigenvalues, self.coefficients, self.operator, self.info = eigenvalues, coefficients, operator, info

    def __len__(self) -> int:
        return len(self.eigenvalues)

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """The eigenvectors in order, (size, P) at a time (the last chunk may be smaller); one pull each."""
        scale = (self.operator.scaling / self.eigenvalues).sqrt()  # (k,)
        for start in range(0, len(self), size):
            stop = min(start + size, len(self))
            local = self.coefficients[:, start:stop].T * scale[start:stop, None]
            yield self.operator.pull(local)

    def dense(self) -> torch.Tensor:
        """All eigenvectors as one (P, k) tensor, as :class:`GGNEigenpairs` keeps them (for tests: k P-vectors)."""
        chunks = list(self.chunks(8))
        return torch.cat(chunks).T.contiguous() if chunks else self.coefficients.new_zeros(self.operator.subset.n_params, 0)


def dual_eigenpairs(operator: DualGGNOperator, rank: int, seed: int, tol: float | None,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs of the dual G: eigenvalues (r,) descending and eigenvectors (n K, r), r <= rank.

    ARPACK Lanczos (basis (n K, 2 rank + 1) float64) for rank < n K - 1, else the dense G from n K products
    (8 at a time) and eigh; ``tol`` as :func:`lanczos_eigenpairs`.
    """
    n_dual = operator.n_dual
    if rank < n_dual - 1:
        return lanczos_eigenpairs(operator, n_dual, rank, seed, tol, dtype)
    identity = torch.eye(n_dual, dtype=operator.subset.dtype, device=operator.subset.device)
    gram = torch.cat([operator.matmat(block) for block in identity.split(8)])
    evals, evecs = torch.linalg.eigh((gram + gram.T) / 2)
    return evals.flip(0)[:rank], evecs.flip(1)[:, :rank]


def streamed_ggn_eigenpairs(subset: ParameterSubset, batches: Batches, factors: OutputFactors, rank: int,
                            subsample: int | None = None, n_data: int | None = None, seed: int = 0,
                            tol: float | None = None, progress: bool = True, what: str = "GGN",
                            desc: str = "GGN products (Lanczos, dual)") -> StreamedGGNEigenpairs:
    """The top-``rank`` GGN eigenpairs of :func:`top_ggn_eigenpairs`, found in the dual space of the subsample.

    Lanczos runs on G = scaling * A A^T (n_sub K, n_sub K), whose nonzero eigenvalues are H's, so its basis holds
    n_sub K numbers per vector instead of P; the eigenvectors are not stored (:class:`StreamedGGNEigenpairs`).
    H has rank <= n_sub K, so at most min(rank, n_sub K) eigenpairs come back (those above round-off, as in
    :func:`top_ggn_eigenpairs`). Arguments as :func:`top_ggn_eigenpairs`'; ``seed`` draws the dual start vector,
    so the eigenvectors agree with :func:`top_ggn_eigenpairs`' to the Lanczos tolerance, not bit for bit.

    Cost: the same number of GGN products as :func:`top_ggn_eigenpairs`' Lanczos (the same nonzero spectrum), or
    n_sub K products when rank >= n_sub K - 1 (a dense eigh of G), and one backward pass over the subsample per
    chunk of eigenvectors used. Memory: the cached subsample and its factors, a (n_sub K, 2 rank + 1) float64
    basis, and a few P-vectors in flight (no P x rank array).

    Raises:
        ValueError, FloatingPointError, RuntimeError: as :func:`top_ggn_eigenpairs`.
    """
    cached, n_sub, n_total = cached_subsample(subset, batches, factors, rank, subsample, n_data)
    with tqdm(desc=desc, disable=not progress, leave=False) as bar:
        operator = DualGGNOperator(subset, cached, n_total / n_sub, bar)
        evals, evecs = dual_eigenpairs(operator, min(rank, operator.n_dual), seed, tol, subset.dtype)
    check_curvature_finite(evals, what)
    check_curvature_finite(evecs, what)
    keep = positive_eigenvalues(evals, subset.n_params)
    local = evecs[operator.start:operator.start + operator.n_local][:, keep].contiguous()
    info = {"rank_requested": rank, "n_sub": n_sub, "n_data": n_total, "seed": seed, "products": operator.products}
    return StreamedGGNEigenpairs(evals[keep].contiguous(), local, operator, info)
