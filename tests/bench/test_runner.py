"""The bench runner on the embedded suite (1 epoch), results files, bad names."""

import json

import pytest
import torch

from posthoc.bench import METHODS, register_method, run_bench
from posthoc.bench.runner import variance_score
from posthoc.predictive import GaussianPredictive


def test_bench_writes_tables_and_plots(tmp_path):
    out = tmp_path / "out"
    report = run_bench("fmnist-embedded", ["map", "temperature"], out_dir=out, checkpoint_dir=tmp_path / "ckpt",
                       epochs=1, progress=False, log=lambda s: None)
    assert [r["method"] for r in report.rows] == ["map", "temperature"]
    for row in report.rows:
        assert 0.5 < row["accuracy"] <= 1.0  # one epoch on 4k images is well above chance (0.1)
        assert row["auroc_variance"] == 0.5  # no variance: constant score
        assert row["fit_s"] >= 0 and row["predict_s"] > 0
    data = json.loads((out / "results.json").read_text())
    assert data["seed"] == 0 and data["machine"]["cpu_count"] >= 1 and "torch" in data["versions"]
    assert data["map"]["epochs"] == 1
    assert data["map"]["checkpoint"].startswith("<checkpoint-dir>/fmnist_cnn-")  # no machine path in results
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.startswith("method,accuracy,nll,ece,brier")
    assert "| map |" in (out / "results.md").read_text()
    for name in ("reliability.png", "ood_entropy_map.png", "ood_entropy_temperature.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))
    # the checkpoint is reused on a second run
    again = run_bench("fmnist-embedded", ["map"], checkpoint_dir=tmp_path / "ckpt", epochs=1, progress=False,
                      log=lambda s: None)
    assert again.map_result.from_cache
    assert again.rows[0]["accuracy"] == report.rows[0]["accuracy"]


def test_unknown_names_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="available: map, temperature"):
        run_bench("fmnist-embedded", ["map", "laplace_typo"], checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown suite 'cifar'"):
        run_bench("cifar", ["map"], checkpoint_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_register_method_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_method("map", lambda ctx: None, "dup")
    assert "map" in METHODS


def test_variance_score():
    mean = torch.zeros(3, 2)
    assert torch.equal(variance_score(GaussianPredictive(mean, var=torch.zeros(3, 2))), torch.zeros(3))
    var = torch.tensor([[1.0, 4.0], [1.0, 1.0], [2.0, 2.0]])
    torch.testing.assert_close(variance_score(GaussianPredictive(mean, var=var)), 0.5 * var.log().sum(-1))


def test_bench_info_figures_are_recorded(tmp_path):
    """A fitted method's bench_info() lands in the JSON row and under the markdown table."""
    from posthoc.baselines import MAP

    class WithInfo(MAP):
        def bench_info(self):
            return {"jvp_evaluations": 1234, "within_tolerance": 0.875}

    name = "map_with_info_test"
    register_method(name, lambda ctx: WithInfo(ctx.model), "MAP that reports figures")
    try:
        report = run_bench("fmnist-embedded", [name], out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt",
                           epochs=1, progress=False, log=lambda s: None)
    finally:
        METHODS.pop(name)
    assert report.rows[0]["info"] == {"jvp_evaluations": 1234, "within_tolerance": 0.875}
    row = json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]
    assert row["info"]["within_tolerance"] == 0.875
    assert f"- {name}: jvp_evaluations 1234, within_tolerance 0.875" in (tmp_path / "out" / "results.md").read_text()


def test_laplace_rows_share_one_fit_per_model_and_data():
    """la_diag and the rows that predict its posterior differently (nn, streamlined) reuse one fitted Laplace."""
    from references import small_mlp
    from torch.utils.data import DataLoader, TensorDataset

    from posthoc.bench.methods import BenchContext, laplace_builder

    x = torch.randn(20, 3, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=10)
    ctx = BenchContext(small_mlp(), None, loader, loader, loader, seed=0, progress=False)
    first = laplace_builder("diag", "all", marglik_steps=2)(ctx)
    assert laplace_builder("diag", "all", marglik_steps=2)(ctx) is first
    assert laplace_builder("kron", "all", marglik_steps=2)(ctx) is not first
    other = BenchContext(small_mlp(seed=1), None, loader, loader, loader, seed=0, progress=False)
    assert laplace_builder("diag", "all", marglik_steps=2)(other) is not first
