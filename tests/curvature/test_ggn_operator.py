"""Top GGN eigenpairs in the dual (Gram) space of the subsample, eigenvectors streamed a chunk at a time (float64).

Checked against torch.linalg.eigh of the dense GGN sum_n J_n^T Gamma_n J_n (references.dense_ggn) and against
the primal Lanczos of :func:`top_ggn_eigenpairs` (stored (P, k) eigenvectors), which the low-rank Laplace keeps.
"""

import pytest
import torch
from references import dense_ggn, minibatches, mlp_data, small_cnn, small_mlp

from posthoc.curvature.ggn_operator import StreamedGGNEigenpairs, streamed_ggn_eigenpairs, top_ggn_eigenpairs
from posthoc.curvature.output_factors import OutputFactors
from posthoc.network.subset import ParameterSubset


def _streamed(subset, x, y, likelihood="classification", **options) -> StreamedGGNEigenpairs:
    return streamed_ggn_eigenpairs(subset, minibatches(subset, x, y), OutputFactors(likelihood), progress=False,
                                   **options)


def _reference(x):
    """A 3-class tanh/ReLU MLP (P = 68) and its dense GGN on the 24 points x, with eigh's pairs descending."""
    subset = ParameterSubset(small_mlp(), "all")
    hessian = dense_ggn(subset, x, "classification")
    evals, evecs = torch.linalg.eigh(hessian)
    return subset, hessian, evals.flip(0), evecs.flip(1)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_streamed_eigenpairs_match_the_dense_ggn(likelihood):
    x, y = mlp_data(likelihood, 24)
    subset = ParameterSubset(small_mlp(), "all")
    hessian = dense_ggn(subset, x, likelihood)
    evals, evecs = torch.linalg.eigh(hessian)
    evals, evecs = evals.flip(0)[:6], evecs.flip(1)[:, :6]
    pairs = _streamed(subset, x, y, likelihood, rank=6, seed=3, tol=1e-12)
    assert len(pairs) == 6 and pairs.info["n_sub"] == 24 and pairs.info["products"] > 0
    torch.testing.assert_close(pairs.eigenvalues, evals, rtol=1e-8, atol=0)
    u = pairs.dense()  # (P, 6), rebuilt as A^T w sqrt(s / lam)
    assert u.shape == (subset.n_params, 6)
    torch.testing.assert_close(u.T @ u, torch.eye(6, dtype=u.dtype), rtol=0, atol=1e-8)
    torch.testing.assert_close(hessian @ u, u * pairs.eigenvalues, rtol=0, atol=1e-8 * float(evals[0]))
    # eigh's eigenvectors up to sign (the top six eigenvalues are distinct: gaps > 1e-3 relative)
    assert float((evals[:-1] - evals[1:]).min() / evals[0]) > 1e-3
    torch.testing.assert_close((u.T @ evecs).abs(), torch.eye(6, dtype=u.dtype), rtol=0, atol=1e-7)


def test_streamed_chunks_are_the_dense_eigenvectors_in_order():
    x, y = mlp_data("classification", 24)
    subset = ParameterSubset(small_mlp(), "all")
    pairs = _streamed(subset, x, y, rank=7, seed=0, tol=1e-12)
    chunks = list(pairs.chunks(3))
    assert [tuple(c.shape) for c in chunks] == [(3, subset.n_params)] * 2 + [(1, subset.n_params)]
    torch.testing.assert_close(torch.cat(chunks), pairs.dense().T, rtol=0, atol=1e-13)


def test_streamed_eigenpairs_equal_the_primal_lanczos():
    """The memory-bounded path and the stored-basis path agree: eigenvalues to 1e-8, the rank-8 spans to 1e-6."""
    x, y = mlp_data("classification", 40, seed=2)
    subset = ParameterSubset(small_mlp(n_hidden=8), "all")
    batches, factors = minibatches(subset, x, y), OutputFactors("classification")
    primal = top_ggn_eigenpairs(subset, batches, factors, 8, seed=1, tol=1e-12, progress=False)
    dual = streamed_ggn_eigenpairs(subset, batches, factors, 8, seed=1, tol=1e-12, progress=False)
    torch.testing.assert_close(dual.eigenvalues, primal.eigenvalues, rtol=1e-8, atol=0)
    u_primal, u_dual = primal.eigenvectors, dual.dense()
    torch.testing.assert_close(u_dual @ u_dual.T, u_primal @ u_primal.T, rtol=0, atol=1e-6)
    # the GGN products are of the same number within a restart or two (the same nonzero spectrum)
    assert dual.info["products"] <= 2 * primal.info["products"]


def test_streamed_eigenpairs_on_a_cnn():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(12, 1, 6, 6, generator=g, dtype=torch.float64), torch.arange(12) % 3
    subset = ParameterSubset(small_cnn(), "all")
    hessian = dense_ggn(subset, x, "classification")
    pairs = _streamed(subset, x, y, rank=5, seed=2, tol=1e-12)
    torch.testing.assert_close(pairs.eigenvalues, torch.linalg.eigvalsh(hessian).flip(0)[:5], rtol=1e-8, atol=0)
    u = pairs.dense()
    torch.testing.assert_close(hessian @ u, u * pairs.eigenvalues, rtol=0, atol=1e-8 * float(pairs.eigenvalues[0]))


def test_streamed_dense_dual_path_and_subsample_scaling():
    """rank >= n_sub K - 1: G from n_sub K products and eigh; every nonzero eigenpair of the scaled subsample GGN."""
    x, y = mlp_data("classification", 24)
    subset = ParameterSubset(small_mlp(), "all")
    n_sub = 4  # the softmax factor S_n is (C, C - 1): dual dimension 4 * 2 = 8 < rank = 20, and H_sub has rank 8
    expected = dense_ggn(subset, x[:n_sub], "classification") * (len(x) / n_sub)
    pairs = _streamed(subset, x, y, rank=20, subsample=n_sub)
    assert pairs.info["products"] == n_sub * 2 and pairs.info["n_data"] == len(x)
    assert len(pairs) == torch.linalg.matrix_rank(expected) == 8
    u = pairs.dense()
    torch.testing.assert_close((u * pairs.eigenvalues) @ u.T, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))
    scaled = _streamed(subset, x, y, rank=20, subsample=n_sub, n_data=1000)
    torch.testing.assert_close(scaled.eigenvalues, pairs.eigenvalues * 1000 / len(x))


def test_streamed_eigenpairs_of_a_zero_ggn_are_empty():
    x, y = mlp_data("classification", 10)
    model = small_mlp()
    with torch.no_grad():
        model[-1].weight.zero_()  # the outputs depend on the last bias alone, which is not covered
    model[-1].requires_grad_(False)
    subset = ParameterSubset(model, "all")
    pairs = _streamed(subset, x, y, rank=3)
    assert len(pairs) == 0 and pairs.dense().shape == (subset.n_params, 0) and list(pairs.chunks(2)) == []


def test_streamed_eigenpairs_reject_bad_arguments():
    x, y = mlp_data("classification", 10)
    subset = ParameterSubset(small_mlp(), "all")
    with pytest.raises(ValueError, match="rank must be in"):
        _streamed(subset, x, y, rank=0)
    with pytest.raises(ValueError, match="subsample must be"):
        _streamed(subset, x, y, rank=2, subsample=0)
    with pytest.raises(ValueError, match="smaller than"):
        _streamed(subset, x, y, rank=2, n_data=3)
