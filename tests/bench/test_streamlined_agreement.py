"""benchmarks/streamlined_agreement.py: its statistics, its MC stopping rule and chunk cache, the shifted inputs,
the WRN's trunk/tail split and the per-(model, option) table."""

import json
from types import SimpleNamespace

import pytest
import torch
from benchmark_scripts import benchmark_module
from torch import nn


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("streamlined_agreement") as module:
        yield module


def _ranks_reference(values):
    """Ranks by counting (no ties): rank_i = #{j: v_j < v_i}."""
    return torch.tensor([float((values < v).sum()) for v in values], dtype=torch.float64)


def test_spearman_is_pearson_of_ranks(bench):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, generator=gen, dtype=torch.float64)
    b = a.exp() + 0.5 * torch.randn(50, generator=gen, dtype=torch.float64)
    ra, rb = _ranks_reference(a), _ranks_reference(b)
    expected = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    assert bench.spearman(a, b) == pytest.approx(expected, abs=1e-12)
    assert bench.spearman(a, a.exp()) == pytest.approx(1.0)  # invariant to monotone maps
    assert bench.spearman(a, -a) == pytest.approx(-1.0)


def test_mc_summary_per_input_variance_and_standard_error(bench):
    gen = torch.Generator().manual_seed(1)
    scales = torch.linspace(0.5, 3.0, 8, dtype=torch.float64)
    outs = torch.randn(4000, 8, 3, generator=gen, dtype=torch.float64) * scales[:, None]
    s = bench.mc_summary(outs)
    torch.testing.assert_close(s["var"], 3 * scales.square(), rtol=0.1, atol=0)
    # summed variance of 3 N(0, σ²): per draw σ² χ²_3 around its mean, SE = σ² sqrt(2 * 3 / S)
    torch.testing.assert_close(s["se"], scales.square() * (6 / 4000) ** 0.5, rtol=0.1, atol=0)
    assert s["se_over_spread"] == pytest.approx(float(s["se"].square().mean().sqrt() / s["var"].std()))


def test_compare_splits_groups_and_totals(bench):
    ref = torch.arange(1.0, 11.0, dtype=torch.float64)
    var = ref * torch.tensor([2.0] * 5 + [0.5] * 5, dtype=torch.float64)
    c = bench.compare(var, ref, n_in=5)
    assert c["total_in"] == pytest.approx(2.0) and c["total_shift"] == pytest.approx(0.5)
    assert c["total"] == pytest.approx(float(var.sum() / ref.sum()))
    assert c["spearman_in"] == pytest.approx(1.0) and c["spearman_shift"] == pytest.approx(1.0)
    assert bench.verdict({"spearman": 0.95, "total": 1.2}) == "yes"
    assert bench.verdict({"spearman": 0.85, "total": 0.7}) == "no: Spearman, total"


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def test_monte_carlo_stops_at_the_criterion_and_resumes_from_its_chunks(bench, tmp_path):
    model = _Tiny().double()
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * torch.linspace(
        0.1, 3, 30, dtype=torch.float64)[:, None]
    variances = {"head.weight": torch.full((2, 4), 0.05, dtype=torch.float64)}
    case = SimpleNamespace(split=None)
    args = SimpleNamespace(min_mc=20, max_mc=2000, mc_chunk=20)
    mc = bench.monte_carlo(model, case, x, variances, args, tmp_path)
    assert mc["se_over_spread"] < bench.SE_FRACTION
    n_chunks = len(list((tmp_path / "mc").iterdir()))
    assert mc["n_mc"] == 20 * n_chunks
    # one chunk fewer did not meet it (or was under min_mc): the loop stopped at the first draw count that did
    if n_chunks > 1:
        fewer = torch.cat([torch.load(tmp_path / "mc" / f"chunk{k}.pt") for k in range(n_chunks - 1)])
        assert bench.mc_summary(fewer)["se_over_spread"] >= bench.SE_FRACTION
    again = bench.monte_carlo(model, case, x, variances, args, tmp_path)  # all from the cache: the same draws
    torch.testing.assert_close(again["var"], mc["var"])
    # the draws are of the stated posterior: the head's output variance given fixed features is exact
    with torch.no_grad():
        features = torch.tanh(model.body(x))
    exact = 2 * 0.05 * features.square().sum(-1)
    assert float((mc["var"] / exact - 1).abs().mean()) < 0.2


def test_swapped_tokens_leave_padding_and_mask(bench):
    from streamlined_agreement_cases import _swap_tokens
    ids = torch.randint(1, 64, (40, 24), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(24) < torch.randint(8, 25, (40, 1), generator=torch.Generator().manual_seed(4))).long()
    data = {"input_ids": ids * mask, "attention_mask": mask}
    out = _swap_tokens(data, 0.3, 64, seed=0)
    assert torch.equal(out["attention_mask"], mask)
    assert torch.equal(out["input_ids"][mask == 0], data["input_ids"][mask == 0])
    changed = (out["input_ids"] != data["input_ids"]).sum() / mask.sum()
    assert 0.2 < float(changed) < 0.35  # 30 % drawn, a 1/63 chance of redrawing the same token


def test_wrn_tail_of_trunk_is_the_forward(bench):
    from streamlined_agreement_cases import CASES
    case = CASES["wrn"]
    torch.manual_seed(0)
    model = case.build().double().eval()
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    trunk, tail = case.split(model)
    torch.testing.assert_close(tail(trunk(x)), model(x), rtol=0, atol=1e-12)
    covered = bench.cover(model, case)
    assert {n for n, _ in tail.named_parameters()} >= set(covered)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(("conv.", "block1.")))


def test_table_joins_cached_records_and_names_missing(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    run = tmp_path / "run" / "mlp" / "nfit100"  # one fit's folder: nfit<N>
    (run / "rows").mkdir(parents=True)
    stats = {"spearman": 0.95, "spearman_in": 0.9, "spearman_shift": 0.97, "total": 1.1, "total_in": 1.0,
             "total_shift": 1.2}
    record = {"model": "mlp", "env": "main", "torch": "x", "n_params": 10, "n_covered": 4, "n_train": 100, "epochs": 1, "acc_in": 0.9,
              "acc_shift": 0.3, "prior_precision": 2.0, "n_fit": 100, "n_mc": 300, "se_over_spread": 0.15, "spread": 2.0, "mc_total_in": 10.0,
              "mc_total_shift": 30.0,
              "glm": stats, "attention_rule": "—"}
    (run / "model.json").write_text(json.dumps(record))
    row = {"mode": "diagonal", "attention": "independent", "layernorm": None, "n_inputs": 400, "seconds": 0.1,
           **stats, "total": 1.5}
    (run / "rows" / "diagonal-independent-none.json").write_text(json.dumps(row))
    (run / "rows" / "full-independent-none.json").write_text(json.dumps(
        {"mode": "full", "attention": "independent", "layernorm": None, "n_inputs": 100, "error": "ValueError: wide"}))
    partial = tmp_path / "run" / "mlp" / "nfit40"  # an earlier fit on fewer inputs: its own section
    (partial / "rows").mkdir(parents=True)
    (partial / "model.json").write_text(json.dumps({**record, "n_fit": 40, "prior_precision": 7.0}))
    results = bench.collect(tmp_path / "run")
    assert [r["n_fit"] for r in results] == [100, 40]  # the largest fit first
    (tmp_path / "results").mkdir()
    bench.write_tables(results, {"tv_vit": "no MHA rule"}, tmp_path / "results")
    table = (tmp_path / "results" / "streamlined_agreement.md").read_text()
    assert "| 1.500 |" in table and "no: total" in table
    assert "not run: ValueError: wide" in table
    assert "- **tv_vit**: no fit on all training inputs: no MHA rule." in table
    full_part, partial_part = table.split("## Earlier fits")
    assert "| 100 | 300 |" in full_part and "| 7 | 40 |" in partial_part and "| 7 | 40 |" not in full_part


@pytest.mark.parametrize("name", ["mlp", "cnn", "small_resnet"])
def test_posthoc_model_splits_are_the_forward(bench, name):
    from streamlined_agreement_cases import CASES
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().double().eval()
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    trunk, tail = case.split(model)
    torch.testing.assert_close(tail(trunk(x)), model(x), rtol=0, atol=1e-12)
    assert {n for n, _ in tail.named_parameters()} >= set(bench.cover(model, case))


def test_full_mode_on_the_tail_equals_full_mode_on_the_model(bench):
    from streamlined_agreement_cases import Case, _sequential_split

    from posthoc.models import MLP
    from posthoc.streamlined import Streamlined
    torch.manual_seed(0)
    model = MLP(12, (6, 5), 3).double().eval()
    case = Case("main", lambda: model, "fmnist", ("fc2.", "fc3."), split=_sequential_split("fc2"))
    covered = bench.cover(model, case)
    variances = {n: torch.full_like(p, 0.01) for n, p in model.named_parameters() if n in covered}
    x = torch.randn(2 * bench.N_GROUP, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mc = {"var": torch.rand(2 * bench.N_GROUP, generator=torch.Generator().manual_seed(6), dtype=torch.float64)}
    option = {"mode": "full", "attention": "independent", "layernorm": None}
    row = bench.streamlined_row(model, case, variances, x, mc, option, n_full=7)
    assert row["on"] == "tail" and row["n_inputs"] == 14 and row["mean_max_abs_err"] <= 1e-12
    idx = torch.cat([torch.arange(7), bench.N_GROUP + torch.arange(7)])
    direct = Streamlined(model, weight_var=variances, activation_covariance="full").predict(x[idx]).var.sum(-1)
    assert row["total"] == pytest.approx(float(direct.sum() / mc["var"][idx].sum()), rel=1e-10)


def test_node_diagnosis_of_a_linear_network_is_exact():
    from streamlined_agreement_nodes import first_outside, mc_nodes, streamlined_nodes
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double().eval()
    variances = {"0.weight": torch.full((4, 3), 0.2, dtype=torch.float64),
                 "1.bias": torch.full((2,), 0.1, dtype=torch.float64)}
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    recorded, graph_module, placeholders = streamlined_nodes(model, variances, x, {})
    assert set(recorded) == {"_0", "_1", "output"}
    mc = mc_nodes(model, graph_module, placeholders, variances, set(recorded), n_mc=4000)
    for name, var in recorded.items():  # a linear network with independent weights: diagonal mode is exact
        torch.testing.assert_close(mc[name][0], var, rtol=0.1, atol=1e-3)
    assert model[0].weight.grad is None and torch.equal(model(x), graph_module(x))  # weights restored
    rows = [{"ratio": 1.0}, {"ratio": 1.4}, {"ratio": 2.0}]
    assert first_outside(rows) is rows[1]


def test_fit_folders_by_size_and_prior_structure(bench, tmp_path):
    from streamlined_agreement_table import delta_label
    for name in ("nfit40", "nfit100-layerwise", "nfit100"):
        (tmp_path / name).mkdir()
    assert [p.name for p in bench.fit_dirs(tmp_path)] == ["nfit100", "nfit100-layerwise", "nfit40"]
    assert bench.fit_size(tmp_path / "nfit100-layerwise") == 100
    assert delta_label({"prior_precision": 7.0}) == "7"
    assert delta_label({"prior_precision": 5.0, "prior_structure": "layerwise",
                        "prior_precision_range": [0.5, 40.0]}) == "layerwise 0.5-40"
