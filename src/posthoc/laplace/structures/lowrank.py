"""Low-rank structure: H on k directions U, with the uncovered directions left out or kept at the prior.

Fit, matrix-free (the ``basis`` option of :meth:`LowRankCurvature.fit`):

``basis="ggn"`` (the default with ``complement="prior"``): the top-k eigenpairs of the GGN by Lanczos on the
matrix-free GGN operator, over the first ``subsample`` examples and scaled to the full data (or densely for
k >= P - 1), as :func:`posthoc.curvature.ggn_operator.top_ggn_eigenpairs` computes them. Eigenpairs not positive
to working precision are dropped (a negative one would make Lambda indefinite); a zero curvature keeps no
eigenpair: the posterior is the prior (k = 0). These are the directions the data pin down best: under
``complement="omit"`` their variance 1/(s lam + delta) is tiny and the predictive stays at the MAP's (NLL gain
0.0006 on the embedded FMNIST CNN at rank 20, evidence prior, probit: the bench's la_lowrank row).

``basis="jacobian"`` (the default with ``complement="omit"``): ELLA's span (Deng et al., 2022): the top-k
eigenvectors V of the Jacobian Gram sum_n J_n^T J_n over the subsample (the directions that move the outputs
most; the same Lanczos with identity output factors; ELLA's Nystrom features with every output instead of one
sampled output per input), then the GGN projected onto them over all the training data,
V^T H V = R diag(lam) R^T, and U = V R, so that U^T H U = diag(lam) and everything below holds unchanged.
lam >= 0 can be near 0: directions that shift all logits together move the outputs a lot but the softmax
ignores them (no GGN curvature in exact arithmetic), so their variance 1/(s lam + delta) is the largest in the
span; the centred probit and MC links ignore them too, the plain probit link does not. Measured (issue 17,
benchmarks/results/lowrank_ella.md): on the embedded FMNIST CNN at rank 20 with the prior by validation NLL,
NLL gain over the MAP 0.0024 (centred probit) to 0.0027 (probit); on benchmarks/defaults.py's four small tasks
the validation recipe never raised NLL and raised ECE by at most 0.0007 under any of the three links ("ggn":
up to 0.0046). Without validation data, the default recipe (fit, ``optimize_prior_precision()``, la(x)'s
centred probit) never raised NLL either (the evidence below; benchmarks/results/defaults.md).

Two posteriors (the ``complement`` option of :meth:`LowRankCurvature.fit`):

``complement="omit"`` (default): the posterior lives on the span of U. With theta = theta* + U z and the prior
restricted to that span, z has precision A = s diag(lam) + U^T D U (k x k; diag(s lam + delta) for a scalar
delta) and the weight covariance is U A^-1 U^T: directions the eigenpairs do not cover get no variance, as in
ELLA (Deng et al., 2022). Keeping the prior variance 1/delta there (below) makes the low-rank predictive
worse than the MAP's on the FMNIST CNN (NLL 2.13 against 0.49 at rank 20: every uncovered direction is at the
marglik prior's width). Memory P k; a predictive needs k JVPs per input and no per-example gradients.

``complement="prior"`` (laplace-torch's ``LowRankLaplace``): Lambda = s U diag(lam) U^T + D, every uncovered
direction keeps the prior. Algebra with U~ = U diag(c), c = sqrt(s lam) and D = diag(delta)
(any prior kind), through the k x k capacitance K = I + U~^T D^-1 U~ = L L^T:
    log det Lambda = sum log delta + log det K              (matrix determinant lemma)
    Lambda^-1 = D^-1 - Y K^-1 Y^T,  Y = D^-1 U~              (Woodbury)
No P x P matrix is formed; memory P k.

The evidence follows the posterior (``logdet_precision``). "prior": the full model's, log det Lambda above
(laplace-torch's). "omit": the evidence of the omitted posterior itself, whose precision is A on span(U) and
unbounded on its complement (the complement is held at theta*): log det A replaces log det Lambda (the
complement's (P - k) log c, c -> inf, does not depend on delta or sigma and is dropped). For a scalar delta,
marglik then solves delta = (P - k + sum_i s lam_i / (s lam_i + delta)) / |theta*|^2: between (P - k) / |theta*|^2
and P / |theta*|^2, the prior whose variance matches the weights' mean square. The full model's evidence
instead counts the uncovered directions as undetermined (gamma = sum_p s lam_p / (s lam_p + delta)), which on
networks whose GGN is near zero (confidently fitted training data) gives a delta 60-6,000x below the validation
optimum: on benchmarks/defaults.py's small tasks 0.05-0.25 against the validation grid's 6-40, NLL up to +631%
over the MAP's (issue 17, benchmarks/results/lowrank_ella.md); the omitted posterior's evidence gives 0.5-36
there (and 100-700 on the MNIST MLP and the FMNIST CNN) and lowered NLL on every one of those tasks under the
centred probit (benchmarks/results/defaults.md). Its value is not comparable with other structures' evidence
(the dropped constant).
"""

from __future__ import annotations

import warnings
from enum import Enum
from typing import Any

import torch
from tqdm.auto import tqdm

from posthoc.curvature.checks import check_curvature_finite
from posthoc.curvature.ggn_operator import top_ggn_eigenpairs
from posthoc.curvature.jacobians import DEFAULT_CHUNK_BYTES, jvp_many, per_example_weighted_grams
from posthoc.curvature.output_factors import OutputFactors
from posthoc.distributed import sum_over_ranks
from posthoc.laplace.prior import per_parameter
from posthoc.laplace.structures.base import (
    Batches,
    CurvatureStructure,
    HessianStructure,
    register_structure,
)
from posthoc.likelihood import Likelihood
from posthoc.network.inputs import ModelInputs, batch_size, take
from posthoc.network.subset import ParameterSubset
from posthoc.utils.checks import check_choice
from posthoc.utils.linalg import cholesky_with_jitter

# Examples x directions per vmapped JVP call in the predictive (bounds the tangent activations held at once).
_JVP_WORK = 4096


class LowRankComplement(str, Enum):
    """What the low-rank posterior does in the directions its eigenpairs do not cover."""

    OMIT = "omit"  # no variance there: covariance U A^-1 U^T (ELLA's treatment; posthoc's default)
    PRIOR = "prior"  # the prior variance 1/delta there (laplace-torch's LowRankLaplace)


class LowRankBasis(str, Enum):
    """Which k directions the low-rank posterior keeps."""

    GGN = "ggn"  # the GGN's top-k eigenvectors: the directions the data pin down best
    JACOBIAN = "jacobian"  # the top-k eigenvectors of sum_n J_n^T J_n (ELLA's Nystrom span), GGN projected onto them


@register_structure
class LowRankCurvature(CurvatureStructure):
    """H ~ U diag(lam) U^T with U (P, k) orthonormal and lam (k,) >= 0, at sigma = 1 and without prior.

    Options of :meth:`fit`:
        rank: k, number of eigenpairs (default 20).
        subsample: number of examples the GGN products use (default None: all); under torch.distributed,
            per rank (each rank caches up to this many of its shard).
        n_data: total number of training examples N, if known (saves the counting pass).
        seed: seed of Lanczos' start vector (default 0).
        tol: relative accuracy of the eigenvalues passed to eigsh (default 1e-10 in float64,
            1e-5 in float32 models, whose products carry float32 round-off).
        chunk_bytes: working memory of one chunk in the glm predictive (default 512 MiB).
        complement: "omit" (default) leaves the uncovered directions out of the posterior (covariance
            U A^-1 U^T, see the module docstring); "prior" keeps the prior there, as laplace-torch's
            LowRankLaplace does (its behaviour, and posthoc's before 0.2).
        basis: "ggn" the GGN's top eigenvectors; "jacobian" ELLA's span, the top eigenvectors of
            sum_n J_n^T J_n with the GGN projected onto them (one more pass, k JVPs per example; see the
            module docstring). Default None: "jacobian" with ``complement="omit"`` (issue 17: with "ggn" the
            omitted posterior's predictive is within 0.001 NLL of the MAP's), "ggn" with ``complement="prior"``
            (laplace-torch's LowRankLaplace).
    """

    structure = HessianStructure.LOWRANK

    def __init__(self, subset: ParameterSubset, eigenvectors: torch.Tensor, eigenvalues: torch.Tensor,
                 info: dict[str, Any] | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 complement: LowRankComplement | str = LowRankComplement.OMIT) -> None:
        super().__init__(subset)
        self.complement = check_choice(complement, LowRankComplement, "complement")
        self.eigenvectors = eigenvectors  # U (P, k)
        self.eigenvalues = eigenvalues  # lam (k,)
        self.info = dict(info or {})  # rank asked, n_sub, n_data, products: provenance, not needed for the algebra
        self.chunk_bytes = chunk_bytes

    @property
    def rank(self) -> int:
        """K, the number of eigenpairs kept (<= the rank asked for)."""
        return self.eigenvalues.numel()

    @classmethod
    def fit(cls, subset: ParameterSubset, batches: Batches, factors: OutputFactors, progress: bool = True,
            rank: int = 20, subsample: int | None = None, n_data: int | None = None, seed: int = 0,
            tol: float | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
            complement: LowRankComplement | str = LowRankComplement.OMIT,
            basis: LowRankBasis | str | None = None, **options: Any) -> "LowRankCurvature":
        """Top-``rank`` eigenpairs by Lanczos on a matrix-free operator: the GGN's, or the Jacobian Gram's.

        ``basis="ggn"``: the GGN's top eigenpairs, one pass over the subsample per product (see
        :func:`posthoc.curvature.ggn_operator.top_ggn_eigenpairs` for the cost and errors). ``basis="jacobian"``:
        the top eigenvectors V of sum_n J_n^T J_n over the subsample (the same Lanczos with identity output
        factors), then one pass over all the batches with k JVPs per example for the projected GGN
        V^T H V = R diag(lam) R^T (k x k); the structure keeps U = V R and lam (>= 0), so that U^T H U is
        diagonal and the posterior algebra is the same for both bases. The options are the class docstring's.

        Raises:
            TypeError: an unknown option. ValueError: an unknown ``complement`` or ``basis`` (before any product).
        """
        if options:
            raise TypeError(f"hessian_structure='lowrank' got unknown options {sorted(options)}; "
                            "it takes rank, subsample, n_data, seed, tol, chunk_bytes, complement, basis")
        complement = check_choice(complement, LowRankComplement, "complement")  # before the costly products
        if not 1 <= rank <= subset.n_params:
            raise ValueError(f"hessian_structure='lowrank' keeps rank={rank} directions (default 20) but the covered "
                             f"weights have P = {subset.n_params}: pass structure_options={{'rank': k}} with "
                             f"1 <= k <= {subset.n_params}, or hessian_structure='full' for so few weights")
        if basis is None:
            basis = LowRankBasis.JACOBIAN if complement is LowRankComplement.OMIT else LowRankBasis.GGN
            if basis is LowRankBasis.JACOBIAN:
                warnings.warn("hessian_structure='lowrank' now keeps ELLA's directions by default "
                              "(structure_options={'basis': 'jacobian'}); until this version it kept the GGN's top "
                              "eigenvectors: pass basis='ggn' for that posterior, or name the basis to silence this "
                              "(CHANGELOG.md)", FutureWarning, stacklevel=3)
        basis = check_choice(basis, LowRankBasis, "basis")
        if basis is LowRankBasis.GGN:
            pairs = top_ggn_eigenpairs(subset, batches, factors, rank, subsample=subsample, n_data=n_data,
                                       seed=seed, tol=tol, progress=progress, what="lowrank",
                                       desc="Laplace fit (lowrank): GGN products")
            if pairs.eigenvalues.numel() < rank:
                warnings.warn(f"hessian_structure='lowrank' (basis='ggn') kept {pairs.eigenvalues.numel()} of the "
                              f"rank={rank} directions asked for: the GGN has no more positive eigenvalues on the "
                              "subsample" + (", and under complement='omit' the others get no posterior variance; "
                                             "basis='jacobian' keeps the Jacobian span instead"
                                             if complement is LowRankComplement.OMIT else ""), UserWarning,
                              stacklevel=3)
            return cls(subset, pairs.eigenvectors, pairs.eigenvalues, {**pairs.info, "basis": basis.value},
                       chunk_bytes, complement)
        pairs = top_ggn_eigenpairs(subset, batches, OutputFactors(Likelihood.REGRESSION), rank, subsample=subsample,
                                   n_data=n_data, seed=seed, tol=tol, progress=progress, what="lowrank",
                                   desc="Laplace fit (lowrank): Jacobian Gram products")
        eigenvectors, eigenvalues = project_ggn(subset, batches, factors, pairs.eigenvectors, progress)
        return cls(subset, eigenvectors, eigenvalues, {**pairs.info, "basis": basis.value}, chunk_bytes, complement)

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

    def _subspace_factor(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Lower Cholesky factor (k, k) of A = s diag(lam) + U^T D U, the precision of z (theta = theta* + U z)."""
        delta = per_parameter(prior, self.subset)
        u = self.eigenvectors
        precision = u.T @ (u * delta.unsqueeze(-1)) + torch.diag(scale * self.eigenvalues)
        return cholesky_with_jitter(precision, "lowrank subspace precision")

    def dense_covariance(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The dense (P, P) posterior covariance of this structure (tests and small nets only).

        U A^-1 U^T ("omit", rank k; O(P^2 k)) or Lambda^-1 ("prior"; O(P^3)).
        """
        if self.complement is LowRankComplement.PRIOR:
            return torch.linalg.inv(self.dense_precision(prior, scale))
        white = torch.linalg.solve_triangular(self._subspace_factor(prior, scale), self.eigenvectors.T, upper=False)
        return white.T @ white

    def dense_precision(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Lambda = s U diag(lam) U^T + D (P, P), the precision of ``complement="prior"`` (O(P^2 k)).

        Under ``complement="omit"`` neither the posterior covariance (:meth:`dense_covariance`) nor the evidence
        (:meth:`logdet_precision`) uses it.
        """
        u = self.eigenvectors
        return scale * (u * self.eigenvalues) @ u.T + torch.diag(per_parameter(prior, self.subset))

    def logdet_precision(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The evidence's log-determinant (0-d): log det A ("omit") or log det Lambda ("prior"), O(P k^2).

        "omit": A = s diag(lam) + U^T D U (k x k), the precision of the posterior on span(U); the posterior holds
        the complement at theta*, whose log-determinant term does not depend on delta or sigma and is left out
        (module docstring). "prior": Lambda = s U diag(lam) U^T + D, sum log delta + log det K (laplace-torch's).
        """
        if self.complement is LowRankComplement.OMIT:
            if self.rank == 0:  # nothing covered: the posterior is theta*
                return self.eigenvalues.new_zeros(())
            return 2 * torch.log(torch.diagonal(self._subspace_factor(prior, scale))).sum()
        delta, _, _, chol = self._factors(prior, scale)
        return torch.log(delta).sum() + 2 * torch.log(torch.diagonal(chol)).sum()

    def posterior_variance(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Diagonal of the posterior covariance (P,), O(P k^2).

        rowsum((U L_A^-T)^2) ("omit") or 1/delta - rowsum((Y L^-T)^2) ("prior").
        """
        if self.complement is LowRankComplement.OMIT:
            white = torch.linalg.solve_triangular(self._subspace_factor(prior, scale), self.eigenvectors.T,
                                                  upper=False)  # L_A^-1 U^T, (k, P)
            return white.square().sum(0)
        delta, c, dinv_u, chol = self._factors(prior, scale)
        white = torch.linalg.solve_triangular(chol, (dinv_u * c).T, upper=False)  # L^-1 Y^T, (k, P)
        return 1 / delta - white.square().sum(0)

    def functional_covariance(self, inputs: ModelInputs, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The glm covariance (B, C, C): (J U) A^-1 (J U)^T ("omit") or J D^-1 J^T - (J Y) K^-1 (J Y)^T ("prior").

        "omit": k JVPs per input (vmapped, in chunks), O(B k (forward + C k)). "prior": J Y = (J D^-1 U) diag(c) takes k JVPs per input (vmapped, in chunks). J D^-1 J^T is the glm covariance
        of the diagonal prior and needs per-example gradients (chunked; Linear layers by a closed form, see
        :func:`posthoc.curvature.jacobians.per_example_weighted_grams`). Nothing P x P or (B, C, P) is held.
        """
        if self.complement is LowRankComplement.OMIT:
            if self.rank == 0:  # nothing covered: no variance
                n_out = self.subset.forward(take(inputs, 0, 1), self.subset.theta_map).shape[-1]
                return self.subset.theta_map.new_zeros(batch_size(inputs), n_out, n_out)
            ju = self._jvps(inputs, self.eigenvectors)  # (B, k, C)
            white = torch.linalg.solve_triangular(self._subspace_factor(prior, scale), ju, upper=False)
            return white.transpose(1, 2) @ white
        delta, c, dinv_u, chol = self._factors(prior, scale)
        prior_part = per_example_weighted_grams(self.subset, inputs, 1 / delta, self.chunk_bytes)
        if self.rank == 0:  # zero curvature: the prior's covariance
            return prior_part
        jy = self._jvps(inputs, dinv_u) * c.unsqueeze(-1)  # (B, k, C)
        white = torch.linalg.solve_triangular(chol, jy, upper=False)  # L^-1 (J Y)^T, (B, k, C)
        return prior_part - white.transpose(1, 2) @ white

    def _jvps(self, inputs: ModelInputs, directions: torch.Tensor) -> torch.Tensor:
        """J(x) V for the columns of V (P, k): (B, k, C), in chunks of about _JVP_WORK example-directions."""
        step = max(1, _JVP_WORK // self.rank)
        jv = torch.cat([jvp_many(self.subset, take(inputs, i, i + step), directions.T)
                        for i in range(0, batch_size(inputs), step)], dim=1)  # (k, B, C)
        return jv.permute(1, 0, 2)

    def sample(self, n_samples: int, prior: torch.Tensor, scale: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
        """Offsets (n_samples, P): U L_A^-T eps_k ("omit", O(P k n)) or D^-1/2 T eps ("prior", below).

        "prior": D^-1/2 T eps with T = (I + W W^T)^-1/2, W = D^-1/2 U~ (P, k): O(P k n) per draw set.

        With W^T W = R diag(sig^2) R^T, T = I - W R diag(g) R^T W^T, g = 1/(r (1 + r)), r = sqrt(1 + sig^2),
        which is smooth at sig = 0 (no division by small singular values).
        """
        if self.complement is LowRankComplement.OMIT:
            eps = torch.randn(self.rank, n_samples, generator=generator, dtype=self.eigenvectors.dtype)
            coords = torch.linalg.solve_triangular(self._subspace_factor(prior, scale).T,
                                                   eps.to(self.eigenvectors.device), upper=True)  # L_A^-T eps
            return (self.eigenvectors @ coords).T
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
        """Eigenpairs (P, k) and (k,), provenance, chunk size and complement."""
        return {"eigenvectors": self.eigenvectors, "eigenvalues": self.eigenvalues, "info": dict(self.info),
                "chunk_bytes": self.chunk_bytes, "complement": self.complement.value}

    @classmethod
    def from_state_dict(cls, subset: ParameterSubset, state: dict[str, Any]) -> "LowRankCurvature":
        """Inverse of :meth:`state_dict`; a state without ``complement`` (saved before it existed) gets "prior"."""
        def load(key: str) -> torch.Tensor:
            return state[key].to(device=subset.device, dtype=subset.dtype)

        return cls(subset, load("eigenvectors"), load("eigenvalues"), state.get("info"),
                   int(state.get("chunk_bytes", DEFAULT_CHUNK_BYTES)), state.get("complement", "prior"))


def project_ggn(subset: ParameterSubset, batches: Batches, factors: OutputFactors, directions: torch.Tensor,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The GGN H = sum_n J_n^T S_n S_n^T J_n over all ``batches`` on the span of ``directions`` V (P, k).

    Returns U = V R (P, k) and lam (k,) >= 0, descending, with V^T H V = R diag(lam) R^T (Rayleigh-Ritz), so
    U^T H U = diag(lam) for orthonormal V. Cost: one pass, k JVPs per example (vmapped, in chunks of about
    _JVP_WORK example-directions), O(N k^2 C) for the sums; under torch.distributed summed over ranks.

    Raises:
        FloatingPointError: NaN/Inf in the projection.
    """
    rank = directions.shape[1]
    if rank == 0:  # outputs that do not depend on the weights: nothing to project
        return directions, directions.new_zeros(0)
    projected = directions.new_zeros(rank, rank)
    step = max(1, _JVP_WORK // rank)
    for inputs, targets in tqdm(batches(), desc="Laplace fit (lowrank): projected GGN", disable=not progress,
                                leave=False):
        for start in range(0, batch_size(inputs), step):
            x, y = take(inputs, start, start + step), targets[start:start + step]
            with torch.no_grad():
                s = factors(subset.forward(x), y)  # (b, C, K)
            jv = jvp_many(subset, x, directions.T)  # (k, b, C)
            weighted = torch.einsum("kbc,bcj->kbj", jv, s)
            projected += torch.einsum("kbj,lbj->kl", weighted, weighted)
    (projected,) = sum_over_ranks([projected], "the projected GGN")
    check_curvature_finite(projected, "lowrank projected GGN")
    values, rotation = torch.linalg.eigh((projected + projected.T) / 2)
    values, rotation = values.flip(0).clamp_min(0), rotation.flip(1)
    return (directions @ rotation).contiguous(), values.contiguous()
