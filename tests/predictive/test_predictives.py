"""GaussianPredictive and SamplePredictive: moments, links, regression, bad input."""

import math

import pytest
import torch

from posthoc.predictive import GaussianPredictive, SamplePredictive

DTYPE = torch.float64


def _cov(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n, n, generator=g, dtype=DTYPE)
    return a @ a.transpose(-1, -2) / n + 0.2 * torch.eye(n, dtype=DTYPE)


def test_diag_and_full_agree():
    mean = torch.randn(4, 3, dtype=DTYPE)
    var = torch.rand(4, 3, dtype=DTYPE) + 0.1
    diag, full = GaussianPredictive(mean, var=var), GaussianPredictive(mean, cov=torch.diag_embed(var))
    for link in ("probit", "bridge", "mc"):
        torch.testing.assert_close(diag.probs(link, n_samples=500, seed=3), full.probs(link, n_samples=500, seed=3))
    torch.testing.assert_close(diag.cov, full.cov)
    torch.testing.assert_close(full.var, var)


def test_mc_is_seeded():
    pred = GaussianPredictive(torch.randn(3, 4, dtype=DTYPE), cov=_cov(3, 4))
    torch.testing.assert_close(pred.probs("mc", seed=1), pred.probs("mc", seed=1))
    assert not torch.equal(pred.probs("mc", seed=1), pred.probs("mc", seed=2))


def test_samples_have_the_covariance():
    cov = _cov(2, 3)
    pred = GaussianPredictive(torch.zeros(2, 3, dtype=DTYPE), cov=cov)
    draws = SamplePredictive(pred.sample(100_000, seed=0))
    # entries of a sample covariance have sd ~ sqrt((S_ii S_jj + S_ij^2)/n) < 0.02 here
    torch.testing.assert_close(draws.cov, cov, atol=0.03, rtol=0)


def test_singular_cov_samples():
    # rank-1 covariance (PSD, singular) must be sampled, not rejected
    v = torch.tensor([[1.0, -1.0, 0.0]], dtype=DTYPE)
    pred = GaussianPredictive(torch.zeros(1, 3, dtype=DTYPE), cov=(v.T @ v).unsqueeze(0))
    s = pred.sample(10, seed=0)
    torch.testing.assert_close(s[..., 0], -s[..., 1])
    torch.testing.assert_close(s[..., 2], torch.zeros_like(s[..., 2]))


def test_regression_log_prob_matches_torch():
    mean, cov = torch.randn(5, 2, dtype=DTYPE), _cov(5, 2, 1)
    y = torch.randn(5, 2, dtype=DTYPE)
    noisy = GaussianPredictive(mean, cov=cov).with_noise(0.3)
    ref = torch.distributions.MultivariateNormal(mean, cov + 0.09 * torch.eye(2, dtype=DTYPE)).log_prob(y)
    torch.testing.assert_close(noisy.log_prob(y), ref)
    var = torch.rand(5, 2, dtype=DTYPE) + 0.1
    ref_diag = torch.distributions.Normal(mean, (var + 0.09).sqrt()).log_prob(y).sum(-1)
    torch.testing.assert_close(GaussianPredictive(mean, var=var).with_noise(0.3).log_prob(y), ref_diag)
    # (B,) targets are accepted for a single output
    one = GaussianPredictive(mean[:, :1], var=var[:, :1]).with_noise(0.3)
    torch.testing.assert_close(one.log_prob(y[:, 0]), one.log_prob(y[:, :1]))


def test_sample_predictive_moments_and_links():
    samples = torch.randn(50, 4, 3, dtype=DTYPE)
    pred = SamplePredictive(samples)
    torch.testing.assert_close(pred.mean, samples.mean(0))
    torch.testing.assert_close(pred.var, samples.var(0))
    torch.testing.assert_close(torch.diagonal(pred.cov, dim1=1, dim2=2), pred.var)
    torch.testing.assert_close(pred.probs(), torch.softmax(samples, -1).mean(0))
    torch.testing.assert_close(pred.probs("probit"), pred.to_gaussian().probs("probit"))


def test_sample_predictive_mixture_log_prob():
    samples = torch.randn(7, 3, 1, dtype=DTYPE)
    y = torch.randn(3, 1, dtype=DTYPE)
    pred = SamplePredictive(samples).with_noise(0.5)
    dens = torch.stack([torch.distributions.Normal(samples[s], 0.5).log_prob(y).exp() for s in range(7)]).mean(0)
    torch.testing.assert_close(pred.log_prob(y), dens.log().squeeze(-1))
    torch.testing.assert_close(pred.var, samples.var(0) + 0.25)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GaussianPredictive(torch.zeros(2, 3)), "exactly one"),
        (lambda: GaussianPredictive(torch.zeros(2, 3), var=torch.zeros(2, 3), cov=torch.zeros(2, 3, 3)), "exactly one"),
        (lambda: GaussianPredictive(torch.zeros(3), var=torch.zeros(3)), r"\(B, C\)"),
        (lambda: GaussianPredictive(torch.zeros(2, 3), var=torch.zeros(2, 4)), "var must have shape"),
        (lambda: GaussianPredictive(torch.zeros(2, 3), cov=torch.zeros(2, 3)), "cov must have shape"),
        (lambda: GaussianPredictive(torch.tensor([[float("nan"), 0.0]]), var=torch.ones(1, 2)), "NaN"),
        (lambda: GaussianPredictive(torch.zeros(1, 2), var=torch.tensor([[1.0, float("inf")]])), "NaN/Inf"),
        (lambda: GaussianPredictive(torch.zeros(1, 2), var=-torch.ones(1, 2)), "negative"),
        (lambda: GaussianPredictive(torch.zeros(1, 2), cov=torch.tensor([[[1.0, 0.5], [0.0, 1.0]]])), "symmetric"),
        (lambda: SamplePredictive(torch.zeros(1, 2, 3)), "at least 2"),
        (lambda: SamplePredictive(torch.zeros(2, 3)), r"\(S, B, C\)"),
    ],
)
def test_bad_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_options():
    pred = GaussianPredictive(torch.zeros(2, 3), var=torch.ones(2, 3))
    with pytest.raises(ValueError, match="'probit', 'bridge', 'mc'"):
        pred.probs("softmax")
    with pytest.raises(ValueError, match="n_samples"):
        pred.probs("mc", n_samples=0)
    with pytest.raises(ValueError, match="sigma_noise"):
        pred.with_noise(-1.0)
    with pytest.raises(ValueError, match="shape"):
        pred.with_noise(1.0).log_prob(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="with_noise"):
        SamplePredictive(torch.zeros(3, 2, 1)).log_prob(torch.zeros(2, 1))
    with pytest.raises(ValueError, match="with_noise"):
        GaussianPredictive(torch.zeros(2, 1), var=torch.zeros(2, 1)).log_prob(torch.zeros(2, 1))
    assert math.isclose(float(pred.probs().sum()), 2.0)


def test_with_noise_adds_the_same_variances_in_every_covariance_form():
    torch.manual_seed(0)
    mean = torch.randn(3, 3, dtype=torch.float64)
    a = torch.randn(3, 3, 2, dtype=torch.float64)
    var = torch.rand(3, 3, dtype=torch.float64)
    forms = [GaussianPredictive(mean, cov=a @ a.transpose(1, 2) + torch.diag_embed(var)),
             GaussianPredictive(mean, var=var, cov_factor=a)]
    for sigma in (0.3, torch.tensor([0.1, 0.2, 0.3]), torch.tensor([[0.1], [0.2], [0.3]]), torch.rand(3, 3) + 0.1):
        noisy = [p.with_noise(sigma) for p in forms]
        expected = (a @ a.transpose(1, 2)).diagonal(0, 1, 2) + var + torch.as_tensor(sigma, dtype=torch.float64) ** 2
        for pred in noisy:  # B == C: a (B, 1) sigma is per input, never read as per output
            torch.testing.assert_close(pred.var, expected)
        torch.testing.assert_close(GaussianPredictive(mean, var=var).with_noise(sigma).var,
                                   var + torch.as_tensor(sigma, dtype=torch.float64) ** 2)
    with pytest.raises(ValueError, match=r"does not broadcast to the outputs \(B, C\) = \(3, 3\)"):
        forms[0].with_noise(torch.full((4,), 0.1))
