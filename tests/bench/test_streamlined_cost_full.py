"""benchmarks/streamlined_cost_full.py: the table keeps the rows of cases this machine did not run."""

import json

import pytest
from benchmark_scripts import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("streamlined_cost_full") as module:
        yield module


def test_restore_writes_missing_cases_and_never_overwrites(bench, tmp_path):
    rows = [{"tag": "here", "model": "resnet18", "threads": 1, "batch": 32, "x_map": 3.8},
            {"tag": "there", "model": "bert_base", "threads": 2, "batch": 32, "x_map": 2.9}]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"meta": {}, "rows": rows}))
    run_dir = tmp_path / "cases"
    local = bench._case_path(run_dir, "here", "resnet18", 1, 32)
    local.parent.mkdir(parents=True)
    local.write_text(json.dumps({**rows[0], "x_map": 2.9}))  # this machine's newer measurement of the same case
    assert bench.restore_cases(run_dir, results) == 1
    assert json.loads(local.read_text())["x_map"] == 2.9
    assert json.loads(bench._case_path(run_dir, "there", "bert_base", 2, 32).read_text()) == rows[1]
    assert bench.restore_cases(run_dir, tmp_path / "missing.json") == 0
