"""benchmarks/defaults.py's bookkeeping: Spearman, worst cases per method, reading bench results."""

import json

import pytest
import torch
from benchmark_scripts import benchmark_module


@pytest.fixture(scope="module")
def defaults():
    with benchmark_module("defaults") as module:
        yield module


def test_spearman_is_pearson_of_ranks(defaults):
    a = torch.tensor([0.3, 2.0, -1.0, 5.0, 4.0], dtype=torch.float64)
    assert defaults.spearman(a, a.exp()) == pytest.approx(1.0)  # monotone map
    assert defaults.spearman(a, -a) == pytest.approx(-1.0)
    b = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0], dtype=torch.float64)
    # ranks of a: 1 2 0 4 3, of b: 0 2 1 4 3; rank differences d = 1 0 -1 0 0: 1 - 6 sum d^2 / (n (n^2 - 1))
    assert defaults.spearman(a, b) == pytest.approx(1 - 6 * 2 / (5 * 24))


def test_worst_case_is_the_largest_excess_and_smallest_gain(defaults):
    tasks = {
        "t1": [{"method": "map", "nll": 1.0, "ece": 0.02, "auroc_entropy": 0.6},
               {"method": "m", "nll": 1.01, "ece": 0.05, "auroc_entropy": 0.7, "spearman_exact_lla": 0.9}],
        "t2": [{"method": "map", "nll": 2.0, "ece": 0.01, "auroc_entropy": 0.5},
               {"method": "m", "nll": 1.9, "ece": 0.03, "auroc_entropy": 0.45, "spearman_exact_lla": 0.95}],
    }
    (row,) = defaults.worst_cases(tasks)
    assert row["method"] == "m" and row["tasks"] == 2
    assert row["worst_nll_excess"] == pytest.approx(0.01) and row["worst_nll_task"] == "t1"
    assert row["worst_ece_excess"] == pytest.approx(0.03) and row["worst_ece_task"] == "t1"
    assert row["worst_auroc_gain"] == pytest.approx(-0.05) and row["worst_spearman"] == pytest.approx(0.9)


def test_bench_rows_are_renamed_merged_and_checked(defaults, tmp_path):
    def results(name, checkpoint, rows):
        path = tmp_path / name
        path.write_text(json.dumps({"map": {"checkpoint": f"/cache/{checkpoint}"}, "rows": rows}))
        return str(path)

    first = results("a.json", "c.pt", [{"method": "la_kron", "nll": 1.0}, {"method": "map", "nll": 0.5}])
    second = results("b.json", "c.pt", [{"method": "la_kron", "nll": 0.9}, {"method": "la_kron_gridsearch"}])
    rows = defaults.read_bench_rows([first, second])
    assert [r["method"] for r in rows] == ["map", "la_kron[probit]", "la_kron_gridsearch"]
    assert rows[1]["nll"] == 0.9 and rows[1]["bench_row"] == "la_kron"  # the later file wins
    other = results("c.json", "other.pt", [{"method": "map"}])
    with pytest.raises(ValueError, match="one MAP checkpoint"):
        defaults.read_bench_rows([first, other])


def test_new_fmnist_rows_join_the_earlier_ones_on_the_same_map(defaults):
    earlier = [{"tasks": {"fmnist-embedded-cnn": [{"method": "map", "nll": 0.5}, {"method": "la_kron", "nll": 0.7}]}}]
    merged = defaults.merge_fmnist(earlier, [{"method": "map", "nll": 0.5}, {"method": "la_kron_centred", "nll": 0.6}])
    assert [r["method"] for r in merged] == ["map", "la_kron", "la_kron_centred"]
    with pytest.raises(ValueError, match="another MAP"):
        defaults.merge_fmnist(earlier, [{"method": "map", "nll": 0.4}])


def test_rerun_rows_replace_those_methods_in_place_and_keep_the_map(defaults):
    earlier = [{"method": "map", "nll": 0.5, "ece": 0.1}, {"method": "temperature", "nll": 0.45},
               {"method": "la_lowrank[probit]", "nll": 2.0}, {"method": "la_kron[probit]", "nll": 0.7}]
    new = [{"method": "map", "nll": 0.5, "ece": 0.2}, {"method": "temperature", "nll": 0.44},
           {"method": "la_lowrank[probit]", "nll": 0.49}, {"method": "la_lowrank[mc]", "nll": 0.48}]
    merged = defaults.merge_rows(earlier, new, "t")
    assert [r["method"] for r in merged] == ["map", "temperature", "la_lowrank[probit]", "la_kron[probit]",
                                             "la_lowrank[mc]"]
    assert merged[0]["ece"] == 0.1 and merged[1]["nll"] == 0.45  # the earlier MAP and temperature rows stay
    assert merged[2]["nll"] == 0.49 and merged[3]["nll"] == 0.7
    assert defaults.merge_rows([], new, "t") == new
    with pytest.raises(ValueError, match="another MAP"):
        defaults.merge_rows(earlier, [{"method": "map", "nll": 0.6}], "t")
