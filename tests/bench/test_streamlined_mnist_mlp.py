"""benchmarks/streamlined_mnist_mlp.py: its metrics, its seed summary and its per-(seed, method) cache."""

import json
import math
import statistics

import pytest
import torch
from benchmark_scripts import benchmark_module
from torch.utils.data import TensorDataset

from posthoc.metrics import auroc, entropy, half_logdet


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("streamlined_mnist_mlp") as module:
        yield module


def _probs(n, seed):
    return torch.softmax(torch.randn(n, 10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2,
                         dim=-1)


def _covs(n, seed, scale):
    a = torch.randn(n, 10, 10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return scale * (a @ a.transpose(1, 2) + 0.1 * torch.eye(10, dtype=torch.float64))


def test_ood_aurocs_are_per_set_and_averaged(bench):
    probs_in, y = _probs(40, 0), torch.arange(40) % 10
    cov_in = _covs(40, 1, 1.0)
    ood = {"FashionMNIST": (_probs(30, 2), _covs(30, 3, 2.0)), "KMNIST": (_probs(20, 4), _covs(20, 5, 0.5))}
    row = bench.method_metrics(probs_in, y, cov_in, ood)
    for name, (probs_out, cov_out) in ood.items():
        assert row["per_ood_set"][name]["auroc_entropy"] == pytest.approx(auroc(entropy(probs_in), entropy(probs_out)))
        assert row["per_ood_set"][name]["auroc_variance"] == pytest.approx(
            auroc(half_logdet(cov_in), half_logdet(cov_out)))
    for key in ("auroc_entropy", "auroc_variance"):
        assert row[key] == pytest.approx(statistics.fmean(v[key] for v in row["per_ood_set"].values()))
    assert row["accuracy"] == pytest.approx(float((probs_in.argmax(-1) == y).double().mean()))


def test_no_covariance_means_no_variance_score(bench):
    probs_in, y = _probs(20, 0), torch.arange(20) % 10
    row = bench.method_metrics(probs_in, y, None, {"KMNIST": (_probs(20, 1), None)})
    assert row["auroc_variance"] is None and row["per_ood_set"]["KMNIST"]["auroc_variance"] is None
    assert row["auroc_entropy"] is not None


def _result(seed, nll, auroc_variance):
    per_set = {name: {"auroc_entropy": 0.5 + 0.1 * seed, "auroc_variance": auroc_variance}
               for name in ("FashionMNIST", "KMNIST")}
    return {"seed": seed, "accuracy": 0.9, "nll": nll, "ece": 0.01, "brier": 0.1, "auroc_entropy": 0.5 + 0.1 * seed,
            "auroc_variance": auroc_variance, "time_per_input_ms": 1.0, "per_ood_set": per_set,
            "prior_precision": 1.0}


def test_summary_is_mean_and_standard_error_over_seeds(bench):
    per_seed = [{"glm": _result(0, 0.2, 0.8), "map": _result(0, 0.3, None)},
                {"glm": _result(1, 0.4, 0.9), "map": _result(1, 0.5, None)},
                {"glm": _result(2, 0.9, 0.7)}]
    rows = {r["method"]: r for r in bench.summarise(per_seed, ("map", "glm"))}
    glm = rows["glm"]
    assert glm["n_seeds"] == 3 and glm["seeds"] == [0, 1, 2]
    assert glm["nll"] == pytest.approx(0.5)
    assert glm["nll_se"] == pytest.approx(statistics.stdev([0.2, 0.4, 0.9]) / math.sqrt(3))
    assert glm["auroc_entropy_KMNIST"] == pytest.approx(0.6)
    assert rows["map"]["n_seeds"] == 2 and rows["map"]["auroc_variance"] is None
    single = bench.summarise([{"glm": _result(0, 0.2, 0.8)}], ("glm",))[0]
    assert single["nll"] == pytest.approx(0.2) and single["nll_se"] is None


def _tiny_data():
    g = torch.Generator().manual_seed(0)

    def images(n):
        return TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(10, (n,), generator=g))

    return {"train": images(64), "test": images(24), "FashionMNIST": images(16), "KMNIST": images(16)}


def test_results_are_cached_per_seed_and_method(bench, tmp_path, monkeypatch):
    data = _tiny_data()
    first = bench.run_seed(0, data, epochs=1, mc_samples=12, run_dir=tmp_path)
    assert set(first) == set(bench.METHODS)
    assert all((tmp_path / f"result-s0-{m}.json").is_file() for m in bench.METHODS)
    # a complete seed is read back without training or fitting anything
    monkeypatch.setattr(bench, "train_mlp", lambda *a, **k: pytest.fail("trained again despite the cache"))
    again = bench.run_seed(0, data, epochs=1, mc_samples=12, run_dir=tmp_path)
    assert again["glm"]["nll"] == first["glm"]["nll"]
    # a result made with other settings does not count: only that method is recomputed
    stale = json.loads((tmp_path / "result-s0-mc.json").read_text())
    stale["settings"]["mc_samples"] = 7
    (tmp_path / "result-s0-mc.json").write_text(json.dumps(stale))
    monkeypatch.undo()
    recomputed = bench.run_seed(0, data, epochs=1, mc_samples=12, run_dir=tmp_path)
    assert recomputed["mc"]["settings"]["mc_samples"] == 12
    assert recomputed["glm"]["nll"] == first["glm"]["nll"]


def test_cached_results_without_timing_get_timed_only(bench, tmp_path, monkeypatch):
    data = _tiny_data()
    first = bench.run_seed(0, data, epochs=1, mc_samples=12, run_dir=tmp_path, methods=("map", "glm"))
    assert all(first[m]["time_per_input_best_ms"] > 0 for m in ("map", "glm"))
    untimed = {k: v for k, v in first["glm"].items() if k != "time_per_input_best_ms"}
    (tmp_path / "result-s0-glm.json").write_text(json.dumps(untimed))
    monkeypatch.setattr(bench, "method_metrics", lambda *a, **k: pytest.fail("metrics recomputed"))
    again = bench.run_seed(0, data, epochs=1, mc_samples=12, run_dir=tmp_path, methods=("map", "glm"))
    assert again["glm"]["time_per_input_best_ms"] > 0 and again["glm"]["nll"] == first["glm"]["nll"]
    assert json.loads((tmp_path / "result-s0-glm.json").read_text())["time_per_input_best_ms"] > 0


def test_few_mc_samples_give_no_variance_score(bench, tmp_path):
    # 10 classes, 5 samples: the samples' covariance is singular, so the variance score is left out, not faked
    row = bench.run_seed(0, _tiny_data(), epochs=1, mc_samples=5, run_dir=tmp_path, methods=("mc",))["mc"]
    assert row["auroc_variance"] is None and row["auroc_entropy"] is not None
