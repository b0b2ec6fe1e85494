"""The m-dimensional posterior over ScaLLA's latent weights w (docs/scalla.md).

f(x) = f(x; theta*) + phi(x)^T w with w ~ N(0, delta^-1 I_m). The GGN over w is
H = sum_n phi(x_n) Gamma_n phi(x_n)^T (m x m), accumulated as an explicit sum of per-batch terms
(:func:`batch_precision`), so a distributed fit can all-reduce the sum. Gamma_n = S_n S_n^T (posthoc's
OutputFactors); regression curvature is stored at sigma = 1 and scaled by s = sigma^-2.

H is diagonalised once (H = U diag(lam) U^T, an m x m eigh, cheaper and more reusable than a
Cholesky per prior value), so Sigma_w = U diag(1 / (s lam + delta)) U^T for any delta and sigma without a
new pass over the data: grid search and evidence maximisation are O(m^3) at most.

The latent algebra (H, its eigenpairs, phi^T Sigma_w phi) runs in float64 whatever the model's dtype: m is small,
and in float32 the eigenvalues carry an absolute error of about eps lambda_max(H), which swamps s lam + delta in
the weakly determined directions once delta is small against lambda_max (a 1-D regression with 4,000 points:
lambda_max 9e4, predictive variances off by a median 230% at delta = 1e-4 and up to 13% at delta = 1). Results
are returned in the model's dtype.
"""

from __future__ import annotations

import torch

from posthoc.utils.linalg import psd_eigh


def batch_precision(features: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """sum_n phi(x_n) S_n S_n^T phi(x_n)^T over a batch: (m, m) float64 from features (B, m, C), factors (B, C, K)."""
    g = features.to(torch.float64) @ factors.to(torch.float64)  # (B, m, K)
    g = g.permute(1, 0, 2).reshape(features.shape[1], -1)
    return g @ g.T


class LatentPosterior:
    """Sigma_w = (s H + delta I)^-1 from the eigenpairs of H (computed in float64, module doc).

    Args:
        precision: H (m, m), at sigma = 1 (kept in float64).
        loglik_stat: the log-likelihood statistic of the training data at theta* (see
            posthoc.curvature.output_factors.log_likelihood_terms).
        n_data, n_outputs: N and C.
        theta_sq_norm: ||theta*||^2 of the network weights; n_params: P (both for the hybrid evidence). Its dtype
            (the model's) is the dtype of the covariances and log-determinants returned.
    """

    def __init__(self, precision: torch.Tensor, loglik_stat: torch.Tensor, n_data: int, n_outputs: int,
                 theta_sq_norm: torch.Tensor, n_params: int) -> None:
        precision = precision.to(torch.float64)
        self.precision = 0.5 * (precision + precision.T)
        self.eigenvalues, self.eigenvectors = psd_eigh(self.precision)
        self.dtype = theta_sq_norm.dtype
        self.loglik_stat, self.n_data, self.n_outputs = loglik_stat, n_data, n_outputs
        self.theta_sq_norm, self.n_params = theta_sq_norm, n_params

    @property
    def n_features(self) -> int:
        """m, the number of latent features (the precision is m x m)."""
        return self.precision.shape[0]

    def covariance(self, features: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """phi(x)^T Sigma_w phi(x): (B, C, C) in the features' dtype from features (B, m, C). Cost O(B m^2 C)."""
        eigenvectors = self.eigenvectors.to(features.device)
        rotated = torch.einsum("km,bkc->bmc", eigenvectors, features.to(torch.float64))
        cov = torch.einsum("bmc,m,bmd->bcd", rotated, self._inverse_eigenvalues(delta, scale, features.device), rotated)
        return (0.5 * (cov + cov.transpose(1, 2))).to(features.dtype)

    def _inverse_eigenvalues(self, delta: torch.Tensor, scale: torch.Tensor, device: torch.device) -> torch.Tensor:
        """1 / (s lam + delta) in float64 on ``device``, differentiable in delta and s."""
        scale64, delta64 = (torch.as_tensor(t).to(device=device, dtype=torch.float64) for t in (scale, delta))
        return 1.0 / (scale64 * self.eigenvalues.to(device) + delta64)

    def logdet_precision(self, delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Log det(s H + delta I_m) in the model's dtype, differentiable in delta and s."""
        return -torch.log(self._inverse_eigenvalues(delta, scale, self.eigenvalues.device)).sum().to(self.dtype)

    def latent_evidence_term(self, delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """-1/2 log det(I + s H / delta): the Occam term of the latent model (no interior optimum in delta)."""
        return -0.5 * (self.logdet_precision(delta, scale) - self.n_features * torch.log(delta))

    def hybrid_evidence(self, loglik: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The authors' hybrid evidence, differentiable in delta and s; cost O(m) given the eigenvalues.

        log p(D | theta*) - 1/2 delta ||theta*||^2 + 1/2 P log delta - 1/2 log det(s H + delta I_m).
        """
        return (loglik - 0.5 * delta * self.theta_sq_norm + 0.5 * self.n_params * torch.log(delta)
                - 0.5 * self.logdet_precision(delta, scale))

    def state_dict(self) -> dict:
        """The precision, the log-likelihood statistic and the counts (for :meth:`from_state_dict`)."""
        return {"precision": self.precision, "loglik_stat": self.loglik_stat, "n_data": self.n_data,
                "n_outputs": self.n_outputs, "theta_sq_norm": self.theta_sq_norm, "n_params": self.n_params}

    @classmethod
    def from_state_dict(cls, state: dict) -> "LatentPosterior":
        """Rebuild the posterior saved by :meth:`state_dict` (its eigendecomposition recomputed, O(m^3))."""
        return cls(state["precision"], state["loglik_stat"], state["n_data"], state["n_outputs"],
                   state["theta_sq_norm"], state["n_params"])

