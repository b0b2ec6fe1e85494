"""benchmarks/laplace_torch_flows.py: its comparisons (relative difference, Monte Carlo z-scores, the float32-noise
rule), its table rows for failures and explained differences, and its exit without laplace-torch."""

import sys

import pytest
import torch
from benchmark_scripts import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("laplace_torch_flows") as module:
        yield module


def _result(det=None, mc=None, exact=None, error=None):
    return {"det": det or {}, "mc": mc or {}, "exact": exact or {}, "notes": {}, "error": error, "seconds": 0.0}


def test_relative_difference_is_per_entry_with_a_floor(bench):
    a = torch.tensor([100.0, 1.0, 0.0], dtype=torch.float64)
    assert bench.relative_difference(a, a * (1 + torch.tensor([0.0, 1e-3, 0.0], dtype=torch.float64))) == pytest.approx(1e-3 / 1.001)
    # an entry near zero counts against FLOOR * max|a| = 0.1, not against itself
    assert bench.relative_difference(a, a + torch.tensor([0.0, 0.0, 1e-6], dtype=torch.float64)) == pytest.approx(1e-5)


def test_mc_z_scores_small_for_one_distribution_large_for_a_shift(bench):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 3, generator=g, dtype=torch.float64), torch.randn(4000, 3, generator=g,
                                                                                 dtype=torch.float64)
    same = bench.mc_z_scores(a, b)
    assert same["mean"] < bench.mc_threshold(3) and same["variance"] < bench.mc_threshold(3)
    assert bench.mc_z_scores(a, b + 0.2)["mean"] > 6
    assert bench.mc_z_scores(a, 1.3 * b)["variance"] > 6
    assert bench.mc_threshold(1) == pytest.approx(3.0, abs=1e-3)


def test_float32_noise_needs_agreeing_float64_results_and_own_errors_that_explain_the_gap(bench):
    a64 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    a, b = a64 + torch.tensor([1e-3, 0.0]), a64 - torch.tensor([1e-3, 0.0])
    assert bench.float32_noise_explains(a, b, a64, a64.clone(), 1e-4)
    assert not bench.float32_noise_explains(a, b, a64, a64 * 1.01, 1e-4)       # float64 results differ
    assert not bench.float32_noise_explains(a, b + 0.1, a64, a64 - torch.tensor([1e-3, 0.0]), 1e-4)


def test_rows_name_failures_missing_quantities_and_known_causes(bench):
    one = torch.tensor([1.0], dtype=torch.float64)
    ref = _result(det={"kron: prior precision": one, "both": one}, exact={"mask": torch.tensor([1, 2])})
    ours = _result(det={"kron: prior precision": one * 1.1}, exact={"mask": torch.tensor([1, 3])},
                   error="TypeError: boom")
    rows = {r["quantity"]: r for r in bench.compare_flow("regression_marglik", {"laplace-torch": ref,
                                                                                "posthoc": ours}, None)}
    assert rows["error (float32)"]["verdict"] == "posthoc fails" and rows["error (float32)"]["posthoc"] == \
        "TypeError: boom"
    assert rows["both"]["verdict"] == "missing on posthoc"
    assert rows["kron: prior precision"]["verdict"].startswith("DIFFERS") and "[1]" in \
        rows["kron: prior precision"]["verdict"]
    assert rows["mask"]["verdict"] == "DIFFERS"


def test_without_laplace_torch_the_script_exits_naming_the_setup(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "laplace", None)    # import laplace raises ImportError
    with pytest.raises(SystemExit, match="venv-bench.*benchmarks/README.md"):
        bench.load_library("laplace-torch")
