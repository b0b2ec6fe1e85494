"""benchmarks/model_zoo_cost.py: the models, one tiny case end to end, the cache, the budget and the goal checks."""

import json

import pytest
import torch
from benchmark_scripts import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("model_zoo_cost") as module:
        yield module


@pytest.fixture(scope="module")
def cases():
    import model_zoo_cost_cases  # on sys.path once the benchmark module is loaded

    return model_zoo_cost_cases


def test_the_models_have_their_published_sizes(bench, cases):
    """CIFAR ResNet-18 has 11,173,962 parameters and WRN-16-4 2,748,890; both map (B, 3, 32, 32) to (B, 10)."""
    for name, n_params in (("resnet18", 11_173_962), ("wrn16_4", 2_748_890)):
        model = cases.build_model(name)
        assert sum(p.numel() for p in model.parameters()) == n_params
        with torch.no_grad():
            assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_tiny_lora_case_in_process(bench, cases, tmp_path):
    """The GPT-2 LoRA kron case on the tiny GPT-2: only the adapters require grad, and the phases add up."""
    pytest.importorskip("peft")
    spec = {"model": "tiny_gpt2", "method": "lora_kron", "library": "posthoc", "n": 8, "batch_size": 4,
            "predict_batch": 4, "n_predict": 8, "predict_budget_s": 60.0, "result": str(tmp_path / "r.json")}
    records = list(cases.run_case(spec))
    record = records[-1]
    assert record["status"] == "done" and record["predict_points"] == 8
    assert 0 < record["n_params_grad"] < record["n_params"]
    assert record["data_pass_s"] + record["eig_s"] == pytest.approx(record["fit_s"])
    assert record["eig_s"] > 0 and record["fit_peak_bytes"] > 0 and record["predict_peak_bytes"] > 0


def test_tiny_case_end_to_end_is_cached(bench, tmp_path):
    """One case in its own capped process: recorded under the run dir, in the table, and skipped on a rerun."""
    argv = ["--models", "tiny_cnn", "--libraries", "posthoc", "--methods", "kron", "--n", "8",
            "--run-dir", str(tmp_path / "run"), "--out-dir", str(tmp_path / "out"), "--time-budget", "300"]
    report = bench.main(argv)
    (row,) = report["rows"]
    assert row["status"] == "done", row["message"]
    assert row["n"] == 8 and row["fit_ratio"] == pytest.approx(row["fit_s"] / row["map_fwd_bwd_s"])
    assert len(row["map_fwd_bwd_runs_s"]) == 2  # before and after the fit, the table's denominator their mean
    assert row["max_peak_bytes"] < bench.GOAL_PEAK_BYTES
    cached = tmp_path / "run" / "tiny_cnn-kron-posthoc-n8.json"
    first = json.loads(cached.read_text())
    assert "| tiny_cnn | 8 | kron | posthoc | done |" in (tmp_path / "out" / "model_zoo_cost.md").read_text()
    bench.main(argv)
    assert json.loads(cached.read_text()) == first  # not run again


def test_a_case_past_its_timeout_is_recorded_over_budget(bench, tmp_path):
    args = bench.parse_args(["--run-dir", str(tmp_path), "--n", "8"])
    case = {"model": "tiny_cnn", "method": "kron", "library": "posthoc", "n": 8}
    record = bench.run_one(case, args, timeout=0.05)
    assert record["status"] == "over budget"
    assert bench.needs_run(record, 10.0, force=False) and not bench.needs_run(record, 0.05, force=False)
    assert not bench.needs_run({**record, "status": "done"}, 10.0, force=False)
    assert bench.needs_run({**record, "status": "killed"}, 0.05, force=False)  # the machine's OOM killer: retry


def test_planned_cases_run_cheap_first_and_every_case_is_listed(bench, tmp_path):
    cases = bench.planned_cases(["resnet18", "wrn16_4", "gpt2"], ["posthoc", "laplace-torch"], 1000, 200)
    methods = [c["method"] for c in cases]
    assert methods.index("kron") > max(i for i, m in enumerate(methods) if m in ("ll_kron", "lora_kron", "scalla"))
    assert all(c["library"] == "posthoc" for c in cases if c["method"] == "scalla")
    assert [c["model"] for c in cases if c["method"] == "kron"] == ["wrn16_4"] * 2 + ["resnet18"] * 2
    args = bench.parse_args(["--run-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path)])
    report = bench.build_report(args, cases)
    assert len(report["rows"]) == len(cases) and {r["status"] for r in report["rows"]} == {"not run"}


def _row(method, **values):
    base = {"model": "wrn16_4", "n": 100, "library": "posthoc", "method": method, "status": "done",
            "max_peak_bytes": 1e9, "data_pass_ratio": 5.0, "fit_s": 10.0}
    return {**base, **values}


def test_goal_checks(bench):
    checks = bench.goal_checks([_row("kron"), _row("diag", fit_s=25.0), _row("ll_kron", max_peak_bytes=9 * 2**30)])
    met = {c["goal"]: c["met"] for c in checks}
    assert met == {"every case under 8 GB": "no", "all-weights kron data pass <= 12x MAP fwd+bwd": "yes",
                   "diag fit <= 2x kron fit": "no"}
    checks = bench.goal_checks([_row("kron", data_pass_ratio=13.0), _row("diag", status="over budget")])
    met = {c["goal"]: c["met"] for c in checks}
    assert met["all-weights kron data pass <= 12x MAP fwd+bwd"] == "no" and met["diag fit <= 2x kron fit"] == "n/a"
