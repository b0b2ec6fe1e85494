"""benchmarks/scalla_authors_metrics.py (the authors' metric code as published) and lla_kfac_reproduction.py's
keeping of earlier rows."""

import json

import pytest
import torch
from benchmark_scripts import benchmark_module

from posthoc.predictive import GaussianPredictive


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("lla_kfac_reproduction") as module:
        yield module


@pytest.fixture(scope="module")
def authors():
    with benchmark_module("scalla_authors_metrics") as module:
        yield module


def _predictive(n=200):
    # a logit covariance dominated by the all-ones direction (which softmax ignores), as the KFAC posteriors are
    ones = torch.ones(3, 1, dtype=torch.float64)
    cov = (25.0 * ones @ ones.T + 0.01 * torch.eye(3, dtype=torch.float64)).expand(n, 3, 3).clone()
    mean = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64).expand(n, 3).clone()
    return GaussianPredictive(mean, cov)


def test_authors_code_samples_with_the_transposed_cholesky_factor(authors):
    pred = _predictive()
    factor = torch.linalg.cholesky(pred.cov[0])
    theirs = authors.authors_code_probs(pred)
    # their samples mean + z^T L have covariance L^T L: MC of that Gaussian gives their probabilities ...
    transposed = GaussianPredictive(pred.mean, (factor.T @ factor).expand_as(pred.cov).clone())
    expected = transposed.probs("mc", n_samples=20000, seed=0).mean(0)
    torch.testing.assert_close(theirs.mean(0), expected, atol=0.01, rtol=0)
    # ... which are far from the Gaussian's own (the all-ones variance is rotated into directions softmax sees)
    correct = pred.probs("mc", n_samples=20000, seed=0).mean(0)
    torch.testing.assert_close(correct, torch.softmax(pred.mean[0], -1), atol=0.01, rtol=0)
    assert (theirs.mean(0) - correct).abs().max() > 0.1


def test_authors_cholesky_adds_their_jitter_to_a_semidefinite_batch(authors):
    cov = torch.ones(2, 3, 3)  # rank one: no Cholesky factor without jitter
    factor = authors.authors_cholesky(cov)
    shifted = factor @ factor.transpose(-1, -2) - cov
    jitter = shifted.diagonal(dim1=-2, dim2=-1)
    assert torch.allclose(jitter, jitter[0, 0].expand_as(jitter)) and 5e-7 <= float(jitter[0, 0]) <= 1e-3  # 1e-6 in float32
    assert torch.allclose(shifted - torch.diag_embed(jitter), torch.zeros(2, 3, 3), atol=1e-5)


def test_earlier_rows_are_imported_into_the_cache_once(bench, tmp_path):
    results = tmp_path / "lla_kfac_reproduction.json"
    rows = [{"variant": "marglik_mc", "per_seed": [{"seed": 0, "ece": 0.03}, {"seed": 1, "ece": 0.031}]},
            {"variant": "authors_map", "per_seed": [{"seed": 1, "ece": 0.01}]}]
    results.write_text(json.dumps({"rows": rows}))
    run_dir = tmp_path / "run"
    assert bench.import_results(results, run_dir) == 3
    assert json.loads((run_dir / "s1" / "marglik_mc.json").read_text()) == {"seed": 1, "ece": 0.031}
    assert (run_dir / "authors_s1" / "authors_map.json").is_file()
    assert bench.import_results(results, run_dir) == 0  # a row already cached is left as it is
    assert bench.seeds_with_rows(run_dir, "s", [0, 1, 2], bench.VARIANTS) == [0, 1]
