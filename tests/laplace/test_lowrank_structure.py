"""Low-rank structure: eigenpairs, posterior algebra and convergence to the full posterior (float64).

``complement="prior"`` (laplace-torch's posterior, the uncovered directions at the prior) is checked against
the inverse of its dense precision; ``complement="omit"`` (the default) against the eigendecomposition of the
exact dense GGN.
"""

import warnings

import pytest
import torch
from references import (
    DTYPE,
    check_logdet_gradient,
    dense_ggn,
    dense_jacobians,
    minibatches,
    random_priors,
    small_cnn,
    small_mlp,
)

from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.prior import per_parameter
from posthoc.laplace.structures.lowrank import LowRankCurvature
from posthoc.network.subset import ParameterSubset


def _fit(subset, x, y, likelihood="classification", **options):
    return LowRankCurvature.fit(subset, minibatches(subset, x, y), OutputFactors(likelihood), progress=False, **options)


def _full_posterior(hessian, subset, prior, scale):
    return scale * hessian + torch.diag(per_parameter(prior, subset))


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
def test_lowrank_full_rank_equals_full_posterior(classification_data, image_data, model_kind):
    x, y = image_data if model_kind == "cnn" else classification_data
    subset = ParameterSubset(small_cnn() if model_kind == "cnn" else small_mlp(), "all")
    hessian = dense_ggn(subset, x, "classification")
    curv = _fit(subset, x, y, rank=subset.n_params, complement="prior")  # the dense eigh path
    # eigenpairs of the rank-deficient GGN at round-off level are dropped; the kept ones rebuild H
    assert curv.rank <= torch.linalg.matrix_rank(hessian)
    u, lam = curv.eigenvectors, curv.eigenvalues
    torch.testing.assert_close((u * lam) @ u.T, hessian, rtol=0, atol=1e-10 * float(hessian.abs().max()))
    jac = dense_jacobians(subset, x[:8])
    for prior in random_priors(subset).values():
        scale = torch.tensor(2.3, dtype=DTYPE)
        precision = _full_posterior(hessian, subset, prior, scale)
        cov = torch.linalg.inv(precision)
        torch.testing.assert_close(curv.functional_covariance(x[:8], prior, scale), jac @ cov @ jac.transpose(1, 2),
                                   rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(curv.logdet_precision(prior, scale), torch.logdet(precision), rtol=1e-6, atol=0)
        torch.testing.assert_close(curv.posterior_variance(prior, scale), torch.diagonal(cov), rtol=1e-6, atol=0)
        torch.testing.assert_close(curv.dense_precision(prior, scale), precision, rtol=1e-6, atol=1e-10)


def test_lowrank_lanczos_eigenpairs_and_algebra(classification_data):
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    hessian = dense_ggn(subset, x, "classification")
    curv = _fit(subset, x, y, rank=6, seed=3, complement="prior")
    top = torch.linalg.eigvalsh(hessian).flip(0)[:6]
    torch.testing.assert_close(curv.eigenvalues, top, rtol=1e-8, atol=0)
    u = curv.eigenvectors
    torch.testing.assert_close(hessian @ u, u * curv.eigenvalues, rtol=0, atol=1e-6 * float(top[0]))
    # the Woodbury / determinant-lemma algebra equals the dense matrix of this structure
    jac = dense_jacobians(subset, x[:8])
    for prior in random_priors(subset).values():
        scale = torch.tensor(0.6, dtype=DTYPE)
        precision = curv.dense_precision(prior, scale)
        cov = torch.linalg.inv(precision)
        torch.testing.assert_close(curv.functional_covariance(x[:8], prior, scale), jac @ cov @ jac.transpose(1, 2),
                                   rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(curv.logdet_precision(prior, scale), torch.logdet(precision), rtol=1e-6, atol=0)
        torch.testing.assert_close(curv.posterior_variance(prior, scale), torch.diagonal(cov), rtol=1e-6, atol=0)


def test_lowrank_converges_to_full_as_rank_grows(classification_data):
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    hessian = dense_ggn(subset, x, "classification")
    prior, scale = torch.tensor([0.05], dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE)
    jac = dense_jacobians(subset, x)
    exact = jac @ torch.linalg.inv(_full_posterior(hessian, subset, prior, scale)) @ jac.transpose(1, 2)
    errors = []
    for rank in (1, 3, 6, 12, 24, 40, subset.n_params):  # seen: 1.07 .34 .11 .023 5e-5 2e-8 5e-14
        approx = _fit(subset, x, y, rank=rank, complement="prior").functional_covariance(x, prior, scale)
        errors.append(float((approx - exact).norm() / exact.norm()))
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 0.1 and errors[-1] < 1e-8, errors


def test_lowrank_subsample_scaling(classification_data):
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    n_sub = 10  # not a multiple of the batch size 7: the second batch is cut
    expected = dense_ggn(subset, x[:n_sub], "classification") * (len(x) / n_sub)
    for n_data in (None, len(x)):
        curv = _fit(subset, x, y, rank=subset.n_params, subsample=n_sub, n_data=n_data, basis="ggn")
        assert curv.info["n_sub"] == n_sub and curv.info["n_data"] == len(x)
        u, lam = curv.eigenvectors, curv.eigenvalues
        torch.testing.assert_close((u * lam) @ u.T, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))
    curv = _fit(subset, x, y, rank=subset.n_params, subsample=n_sub, n_data=1000, basis="ggn")
    torch.testing.assert_close(curv.eigenvalues, _fit(subset, x, y, rank=subset.n_params, subsample=n_sub,
                                                      basis="ggn").eigenvalues * 1000 / len(x))


def test_ggn_basis_warns_when_it_keeps_fewer_directions_than_asked(classification_data):
    """A subsample of 10 examples x 3 outputs gives the GGN rank < P: the missing directions are named, not hidden."""
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    with pytest.warns(UserWarning, match=r"kept \d+ of the rank=\d+ directions.*basis='jacobian'"):
        curv = _fit(subset, x, y, rank=subset.n_params, subsample=10, basis="ggn")
    assert curv.rank < subset.n_params


@pytest.mark.parametrize("prior_kind", ["scalar", "parameter"])
def test_lowrank_logdet_gradient_matches_finite_differences(classification_data, prior_kind):
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    curv = _fit(subset, x, y, rank=8)
    check_logdet_gradient(curv, random_priors(subset)[prior_kind])


def test_lowrank_sample_covariance(classification_data):
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    curv = _fit(subset, x, y, rank=10, complement="prior")
    prior, scale = random_priors(subset)["parameter"], torch.tensor(1.7, dtype=DTYPE)
    cov = torch.linalg.inv(curv.dense_precision(prior, scale))
    n = 40_000
    draws = curv.sample(n, prior, scale, torch.Generator().manual_seed(0))
    assert draws.shape == (n, subset.n_params)
    empirical = draws.T @ draws / n
    # entrywise standard error of a Gaussian second moment: sqrt((S_ii S_jj + S_ij^2) / n); allow 6 of them
    var = torch.diagonal(cov)
    std_err = ((var.unsqueeze(0) * var.unsqueeze(1) + cov.square()) / n).sqrt()
    assert float(((empirical - cov).abs() / std_err).max()) < 6


def test_lowrank_state_dict_round_trip_and_options(classification_data):
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    curv = _fit(subset, x, y, rank=5)
    loaded = LowRankCurvature.from_state_dict(subset, curv.state_dict())
    prior, scale = torch.tensor([0.5], dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE)
    assert torch.equal(loaded.eigenvectors, curv.eigenvectors) and loaded.info == curv.info
    assert torch.equal(loaded.functional_covariance(x, prior, scale), curv.functional_covariance(x, prior, scale))
    with pytest.raises(TypeError, match="unknown options"):
        _fit(subset, x, y, rank=5, bogus=1)
    with pytest.raises(ValueError, match="rank"):
        _fit(subset, x, y, rank=0)
    with pytest.raises(ValueError, match=r"rank=\d+ directions \(default 20\).*structure_options=\{'rank': k\}"):
        _fit(subset, x, y, rank=subset.n_params + 1)
    with pytest.raises(ValueError, match="empty"):
        LowRankCurvature.fit(subset, lambda: iter([]), OutputFactors("classification"), progress=False)


def _top_eigenpairs(hessian, rank):
    """The top-``rank`` eigenpairs of the dense GGN by a float64 eigendecomposition: (P, k), (k,)."""
    values, vectors = torch.linalg.eigh(hessian)
    return vectors[:, -rank:].flip(1), values[-rank:].flip(0)


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
def test_lowrank_omit_equals_subspace_posterior_of_exact_ggn(classification_data, image_data, model_kind):
    """The default posterior: covariance U (s diag(lam) + U^T D U)^-1 U^T from the exact GGN's top eigenpairs."""
    x, y = image_data if model_kind == "cnn" else classification_data
    subset = ParameterSubset(small_cnn() if model_kind == "cnn" else small_mlp(), "all")
    hessian = dense_ggn(subset, x, "classification")
    rank = 6
    curv = _fit(subset, x, y, rank=rank, seed=1, basis="ggn")
    assert curv.complement.value == "omit"
    u, lam = _top_eigenpairs(hessian, rank)
    jac = dense_jacobians(subset, x[:8])
    scale = torch.tensor(1.9, dtype=DTYPE)
    for kind, prior in random_priors(subset).items():
        delta = per_parameter(prior, subset)
        reference = u @ torch.linalg.inv(scale * torch.diag(lam) + u.T @ (delta.unsqueeze(-1) * u)) @ u.T
        if kind == "scalar":  # the ELLA form U diag(1 / (s lam + delta)) U^T
            torch.testing.assert_close(reference, (u / (scale * lam + delta[0])) @ u.T, rtol=1e-10, atol=1e-14)
        atol = 1e-10 * float(reference.abs().max())
        torch.testing.assert_close(curv.dense_covariance(prior, scale), reference, rtol=1e-6, atol=atol)
        torch.testing.assert_close(curv.posterior_variance(prior, scale), torch.diagonal(reference),
                                   rtol=1e-6, atol=atol)
        torch.testing.assert_close(curv.functional_covariance(x[:8], prior, scale),
                                   jac @ reference @ jac.transpose(1, 2), rtol=1e-6, atol=1e-12)
        # the evidence is the omitted posterior's: log det A on span(U) (tests/laplace/test_lowrank_evidence.py)
        torch.testing.assert_close(curv.logdet_precision(prior, scale),
                                   torch.logdet(scale * torch.diag(lam) + u.T @ (delta.unsqueeze(-1) * u)),
                                   rtol=1e-8, atol=0)


def test_lowrank_omit_covariance_is_below_prior_complement(classification_data):
    """Leaving the complement out only removes variance: Lambda^-1 - U A^-1 U^T is positive semi-definite."""
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    omit = _fit(subset, x, y, rank=5)
    prior_kept = LowRankCurvature(subset, omit.eigenvectors, omit.eigenvalues, complement="prior")
    scale = torch.tensor(1.0, dtype=DTYPE)
    for prior in random_priors(subset).values():
        gap = prior_kept.dense_covariance(prior, scale) - omit.dense_covariance(prior, scale)
        assert float(torch.linalg.eigvalsh(gap).min()) > -1e-10
        assert float(torch.linalg.eigvalsh(gap).max()) > 0.1  # the uncovered directions' prior variance


def test_lowrank_omit_sample_covariance_and_zero_rank(classification_data):
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    curv = _fit(subset, x, y, rank=4)
    prior, scale = random_priors(subset)["layer"], torch.tensor(0.8, dtype=DTYPE)
    cov = curv.dense_covariance(prior, scale)
    n = 40_000
    draws = curv.sample(n, prior, scale, torch.Generator().manual_seed(0))
    assert draws.shape == (n, subset.n_params)
    # the draws lie in the span of U, with the covariance U A^-1 U^T (6 standard errors entrywise)
    residual = draws - (draws @ curv.eigenvectors) @ curv.eigenvectors.T
    assert float(residual.abs().max()) < 1e-10
    empirical = draws.T @ draws / n
    var = torch.diagonal(cov)
    std_err = ((var.unsqueeze(0) * var.unsqueeze(1) + cov.square()) / n).sqrt().clamp_min(1e-12)
    assert float(((empirical - cov).abs() / std_err).max()) < 6
    empty = LowRankCurvature(subset, curv.eigenvectors[:, :0], curv.eigenvalues[:0])
    assert torch.equal(empty.functional_covariance(x[:5], prior, scale), torch.zeros(5, 3, 3, dtype=DTYPE))


def test_lowrank_complement_option_and_state(classification_data):
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    with pytest.raises(ValueError, match="complement"):
        _fit(subset, x, y, rank=3, complement="zero")
    curv = _fit(subset, x, y, rank=3, complement="prior")
    state = curv.state_dict()
    assert LowRankCurvature.from_state_dict(subset, state).complement.value == "prior"
    state.pop("complement")  # a state saved before the option existed kept the prior on the complement
    assert LowRankCurvature.from_state_dict(subset, state).complement.value == "prior"
    assert LowRankCurvature.from_state_dict(subset, _fit(subset, x, y, rank=3).state_dict()).complement.value == "omit"


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
def test_lowrank_jacobian_basis_is_ggn_posterior_on_jacobian_gram_span(classification_data, image_data, model_kind):
    """basis="jacobian" (ELLA's span): top eigenvectors V of sum_n J_n^T J_n, GGN posterior restricted to span(V)."""
    x, y = image_data if model_kind == "cnn" else classification_data
    subset = ParameterSubset(small_cnn() if model_kind == "cnn" else small_mlp(), "all")
    rank, n_sub = 5, 16
    curv = _fit(subset, x, y, rank=rank, subsample=n_sub, seed=2, basis="jacobian")
    assert curv.info["basis"] == "jacobian" and curv.rank == rank
    jac_sub = dense_jacobians(subset, x[:n_sub]).reshape(-1, subset.n_params)
    v = _top_eigenpairs(jac_sub.T @ jac_sub, rank)[0]
    u = curv.eigenvectors
    # the same span (projectors agree), orthonormal, and the GGN over all the data diagonal on it
    torch.testing.assert_close(u @ u.T, v @ v.T, rtol=0, atol=1e-8)
    torch.testing.assert_close(u.T @ u, torch.eye(rank, dtype=DTYPE), rtol=0, atol=1e-10)
    hessian = dense_ggn(subset, x, "classification")
    projected = u.T @ hessian @ u
    torch.testing.assert_close(projected, torch.diag(curv.eigenvalues), rtol=0, atol=1e-8 * float(projected.abs().max()))
    assert bool((curv.eigenvalues[:-1] >= curv.eigenvalues[1:]).all())
    jac = dense_jacobians(subset, x[:8])
    scale = torch.tensor(1.7, dtype=DTYPE)
    for prior in random_priors(subset).values():
        delta = per_parameter(prior, subset)
        reference = v @ torch.linalg.inv(v.T @ (scale * hessian + torch.diag(delta)) @ v) @ v.T
        atol = 1e-8 * float(reference.abs().max())
        torch.testing.assert_close(curv.dense_covariance(prior, scale), reference, rtol=1e-6, atol=atol)
        torch.testing.assert_close(curv.functional_covariance(x[:8], prior, scale),
                                   jac @ reference @ jac.transpose(1, 2), rtol=1e-6, atol=1e-10)


def test_lowrank_jacobian_basis_differs_from_ggn_basis_and_checks_the_option(classification_data):
    """The Jacobian Gram's span is not the GGN's (the variance it keeps is larger); bad ``basis`` names the choices."""
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a named basis changes nothing: no warning
        ggn = _fit(subset, x, y, rank=4, basis="ggn")
        _fit(subset, x, y, rank=2, basis="jacobian")
    with pytest.warns(FutureWarning, match="basis='ggn'"):  # the default changed meaning: said, with the old spelling
        jacobian = _fit(subset, x, y, rank=4)  # the default with complement="omit"
    assert float((ggn.eigenvectors @ ggn.eigenvectors.T - jacobian.eigenvectors @ jacobian.eigenvectors.T).norm()) > 0.1
    assert ggn.info["basis"] == "ggn" and jacobian.info["basis"] == "jacobian"
    assert _fit(subset, x, y, rank=4, complement="prior").info["basis"] == "ggn"  # laplace-torch's LowRankLaplace
    with pytest.raises(ValueError, match="basis"):
        _fit(subset, x, y, rank=3, basis="ntk")
