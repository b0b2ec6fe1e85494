"""EKFAC: corrected eigenvalues are the exact curvature's diagonal in the KFAC eigenbasis (float64).

For any data, E = Σ_n Σ_k (Qᵀ ∇θ_nk)² = diag(Qᵀ H Q) with H the exact curvature block
(H = Σ_n Σ_k ∇θ_nk ∇θ_nkᵀ) and Q = Q_G ⊗ Q_A (bias: Q_G). So EKFAC is the best
approximation of H that is diagonal in that basis (Frobenius norm), hence never
worse than KFAC there; on one example of a Linear-only net KFAC is exact, Q
diagonalises H, and EKFAC equals KFAC. The posterior algebra (logdet, functional
covariance, samples, state dict) against EKFAC's own dense precision is tested with
KronCurvature's in test_kron_structure.py.
"""

import pytest
import torch
from references import DTYPE, dense_ef, dense_ggn, dense_jacobians, small_cnn, small_mlp

from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.structures.ekfac import EKFACCurvature
from posthoc.laplace.structures.kron import KronCurvature
from posthoc.network.subset import ParameterSubset


def _fit(cls, subset, x, y, likelihood, curvature="ggn", **options):
    def batches():
        for i in range(0, len(x), 4):
            yield subset.inputs(x[i:i + 4]), y[i:i + 4]
    return cls.fit(subset, batches, OutputFactors(likelihood, curvature), progress=False, **options)


def _basis(block):
    return torch.kron(block.q_out, block.q_in) if block.is_weight else block.q_out


def _exact_block(exact, subset, block):
    return exact[subset.blocks[block.index].slice, subset.blocks[block.index].slice]


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", ["mlp", "mlp_ef", "regression", "cnn"])
def test_eigenvalues_are_exact_diagonal_in_kfac_basis(classification_data, regression_data, image_data, case,
                                                      kfac_approx):
    curvature = "ef" if case == "mlp_ef" else "ggn"
    if case == "regression":
        (x, y), model, likelihood = regression_data, small_mlp(n_out=1), "regression"
    elif case == "cnn":
        (x, y), model, likelihood = image_data, small_cnn(), "classification"
    else:
        (x, y), model, likelihood = classification_data, small_mlp(), "classification"
    subset = ParameterSubset(model, "all")
    ekfac = _fit(EKFACCurvature, subset, x, y, likelihood, curvature, kfac_approx=kfac_approx)
    kfac = _fit(KronCurvature, subset, x, y, likelihood, curvature, kfac_approx=kfac_approx)
    exact = dense_ef(subset, x, y, likelihood) if curvature == "ef" else dense_ggn(subset, x, likelihood)
    assert len(ekfac.blocks) == len(subset.blocks)
    for blk, kfac_blk in zip(ekfac.blocks, kfac.blocks, strict=True):
        basis, block = _basis(blk), _exact_block(exact, subset, blk)
        in_basis = torch.diagonal(basis.T @ block @ basis).reshape(blk.eigenvalues.shape)
        torch.testing.assert_close(blk.eigenvalues, in_basis, rtol=1e-9, atol=1e-12)
        # same basis as KFAC, and the Frobenius-optimal diagonal in it
        torch.testing.assert_close(blk.q_out, kfac_blk.q_out, rtol=0, atol=0)
        ekfac_error = torch.linalg.norm(block - (basis * blk.eigenvalues.reshape(-1)) @ basis.T)
        kfac_error = torch.linalg.norm(block - (basis * kfac_blk.eigenvalues.reshape(-1)) @ basis.T)
        assert float(ekfac_error) <= float(kfac_error) + 1e-10


@pytest.mark.parametrize("subset_kind", ["all", "last_layer"])
def test_one_example_linear_net_equals_kfac_and_exact(classification_data, subset_kind):
    x, y = classification_data
    x, y = x[:1], y[:1]
    subset = ParameterSubset(small_mlp(), subset_kind)
    ekfac = _fit(EKFACCurvature, subset, x, y, "classification")
    kfac = _fit(KronCurvature, subset, x, y, "classification")
    prior, scale = torch.tensor([1.0], dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE)
    exact = dense_ggn(subset, subset.inputs(x), "classification")
    ekfac_dense = ekfac.dense_precision(prior, scale) - torch.eye(subset.n_params, dtype=DTYPE)
    torch.testing.assert_close(ekfac.dense_precision(prior, scale), kfac.dense_precision(prior, scale),
                               rtol=0, atol=1e-10)
    for block in subset.blocks:
        torch.testing.assert_close(ekfac_dense[block.slice, block.slice], exact[block.slice, block.slice],
                                   rtol=0, atol=1e-10)


def test_ekfac_posterior_algebra_matches_its_dense_precision(image_data):
    x, y = image_data
    subset = ParameterSubset(small_cnn(), "all")
    ekfac = _fit(EKFACCurvature, subset, x, y, "classification")
    prior = torch.linspace(0.3, 2.0, len(subset.blocks), dtype=DTYPE)
    scale = torch.tensor(1.3, dtype=DTYPE)
    precision = ekfac.dense_precision(prior, scale)
    torch.testing.assert_close(ekfac.logdet_precision(prior, scale), torch.logdet(precision))
    jac = dense_jacobians(subset, x[:4])
    expected = jac @ torch.linalg.inv(precision) @ jac.transpose(1, 2)
    torch.testing.assert_close(ekfac.functional_covariance(x[:4], prior, scale), expected, rtol=1e-6, atol=1e-12)
