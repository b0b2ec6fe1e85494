"""A covariance kept as F Fᵀ + diag(d): every reading equals the dense predictive's, in float64."""

import pytest
import torch

from posthoc.predictive import GaussianPredictive
from posthoc.predictive.batching import concat
from posthoc.predictive.scale import scale_predictive

B, C, R = 6, 9, 4


def _pair(seed: int = 0, zero_diag: bool = False) -> tuple[GaussianPredictive, GaussianPredictive]:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    factor = torch.randn(B, C, R, generator=g, dtype=torch.float64)
    diag = torch.zeros(B, C, dtype=torch.float64) if zero_diag else torch.rand(B, C, generator=g, dtype=torch.float64)
    dense = factor @ factor.transpose(1, 2) + torch.diag_embed(diag)
    return (GaussianPredictive(mean, var=diag, cov_factor=factor), GaussianPredictive(mean, cov=dense))


def test_variances_covariance_and_deterministic_links_equal_the_dense_predictive():
    factored, dense = _pair()
    assert factored.has_full_cov and factored.cov_factor is not None
    torch.testing.assert_close(factored.var, dense.var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(factored.cov, dense.cov, rtol=1e-12, atol=1e-12)
    for link in ("probit", "probit_centred", "bridge"):
        torch.testing.assert_close(factored.probs(link), dense.probs(link), rtol=1e-10, atol=1e-12)


def test_centred_probit_ignores_a_factor_column_along_the_ones_direction():
    # a factor column c·1 shifts every logit together: softmax, hence the centred probit, cannot see it
    factored, _ = _pair(1)
    ones = torch.ones(B, C, 1, dtype=torch.float64) * 3.0
    shifted = GaussianPredictive(factored.mean, var=factored.cov_diag, cov_factor=torch.cat([factored.cov_factor, ones], -1))
    torch.testing.assert_close(shifted.probs("probit_centred"), factored.probs("probit_centred"), rtol=1e-12, atol=0)


def test_samples_have_the_factored_covariance():
    factored, dense = _pair(2)
    samples = factored.sample(200_000, seed=3)
    centred = samples - samples.mean(0)
    empirical = torch.einsum("sbi,sbj->bij", centred, centred) / (samples.shape[0] - 1)
    # each entry's Monte Carlo standard error is about sqrt((Σ_ii Σ_jj + Σ_ij²) / S)
    var = torch.diagonal(dense.cov, dim1=1, dim2=2)
    se = ((var.unsqueeze(2) * var.unsqueeze(1) + dense.cov.square()) / samples.shape[0]).sqrt()
    assert float(((empirical - dense.cov).abs() / se).max()) < 5.5
    torch.testing.assert_close(samples.mean(0), factored.mean, atol=float(5 * (var / 2e5).sqrt().max()), rtol=0)
    # the MC link averages softmax over these samples
    torch.testing.assert_close(factored.probs("mc", n_samples=500, seed=4),
                               torch.softmax(factored.sample(500, seed=4), -1).mean(0), rtol=0, atol=0)


def test_noise_log_prob_scaling_cast_and_concatenation_keep_the_factor():
    factored, dense = _pair(5, zero_diag=True)
    noisy, noisy_dense = factored.with_noise(0.3), dense.with_noise(0.3)
    assert noisy.cov_factor is not None
    torch.testing.assert_close(noisy.cov, noisy_dense.cov, rtol=1e-12, atol=1e-12)
    y = torch.randn(B, C, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(noisy.log_prob(y), noisy_dense.log_prob(y), rtol=1e-10, atol=1e-10)
    scaled = scale_predictive(factored, 2.5)
    assert scaled.cov_factor is not None
    torch.testing.assert_close(scaled.cov, 2.5 * dense.cov, rtol=1e-12, atol=1e-12)
    single = factored.to(torch.float32)
    assert single.cov_factor is not None and single.cov_factor.dtype == torch.float32
    joined = concat([factored, _pair(7)[0]])
    assert joined.cov_factor is not None and joined.cov_factor.shape == (2 * B, C, R)
    torch.testing.assert_close(joined.cov, torch.cat([dense.cov, _pair(7)[1].cov]), rtol=1e-12, atol=1e-12)
    mixed = concat([factored, dense])  # one factored and one dense: the dense join
    assert mixed.cov_factor is None and mixed.has_full_cov
    torch.testing.assert_close(mixed.cov, torch.cat([dense.cov, dense.cov]), rtol=1e-12, atol=1e-12)


def test_bad_factors_are_refused():
    factored, dense = _pair()
    with pytest.raises(ValueError, match="cov_factor needs var"):
        GaussianPredictive(dense.mean, cov=dense.cov, cov_factor=factored.cov_factor)
    with pytest.raises(ValueError, match="cov_factor must have shape"):
        GaussianPredictive(dense.mean, var=factored.cov_diag, cov_factor=factored.cov_factor[:, :-1])
    bad = factored.cov_factor.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="cov_factor"):
        GaussianPredictive(dense.mean, var=factored.cov_diag, cov_factor=bad)
    with pytest.raises(ValueError, match="negative"):
        GaussianPredictive(dense.mean, var=-factored.cov_diag, cov_factor=factored.cov_factor)
