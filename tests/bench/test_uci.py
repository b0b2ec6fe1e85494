"""posthoc.bench.uci: mean ± SE, original-unit metrics, the per-cell cache and MAP resume (synthetic data)."""

import json
import math

import pytest
import torch

from posthoc.bench import uci
from posthoc.data.uci import UCISplit
from posthoc.predictive.gaussian import GaussianPredictive


def synthetic_split(n_train=40, n_test=10, n_features=3, index=0, name="yacht"):
    gen = torch.Generator().manual_seed(index)
    return UCISplit(name=name, split=index, x_train=torch.randn(n_train, n_features, generator=gen),
                    y_train=torch.randn(n_train, 1, generator=gen), x_test=torch.randn(n_test, n_features, generator=gen),
                    y_test=torch.randn(n_test, 1, generator=gen), x_mean=torch.zeros(n_features),
                    x_std=torch.ones(n_features), y_mean=torch.tensor([3.0]), y_std=torch.tensor([2.5]))


def test_mean_se_is_mean_and_sample_std_over_sqrt_n():
    mean, se = uci.mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)  # sample variance 5/3 (ddof 1), n = 4
    single_mean, single_se = uci.mean_se([7.0])
    assert single_mean == 7.0 and math.isnan(single_se)
    with pytest.raises(ValueError, match="at least one"):
        uci.mean_se([])


def test_original_units_matches_the_gaussian_density_of_unstandardised_targets():
    split = synthetic_split()
    mean, sd = torch.randn(10, 1, dtype=torch.float64) * 0.3, torch.rand(10, 1, dtype=torch.float64) + 0.5
    pred = GaussianPredictive(mean, var=sd**2)
    nll, rmse = uci.original_units(pred, split)
    y = split.y_to_original(split.y_test.double())
    reference = torch.distributions.Normal(split.y_to_original(mean), sd * 2.5)
    assert nll == pytest.approx(-float(reference.log_prob(y).mean()), rel=1e-6)
    assert rmse == pytest.approx(float(((split.y_to_original(mean) - y) ** 2).mean().sqrt()), rel=1e-6)


def test_residual_sigma_is_the_rms_training_residual():
    model = torch.nn.Linear(2, 1)
    x, y = torch.randn(20, 2), torch.randn(20, 1)
    with torch.no_grad():
        expected = float((model(x) - y).pow(2).mean().sqrt())
    assert uci.residual_sigma(model, x, y) == pytest.approx(expected)


def test_cache_computes_a_cell_once_and_a_new_cache_resumes_from_disk(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"nll": 1.5, "rmse": 0.2}

    first = uci.UCICellCache(tmp_path).run("concrete", 3, "map", compute)
    again = uci.UCICellCache(tmp_path).run("concrete", 3, "map", compute)  # e.g. a rerun after a kill
    assert len(calls) == 1
    assert first == again == {"dataset": "concrete", "split": 3, "method": "map", "nll": 1.5, "rmse": 0.2}
    assert json.loads((tmp_path / "concrete" / "split_3" / "map.json").read_text()) == first
    assert not uci.UCICellCache(tmp_path).has("concrete", 3, "fiber")


def test_rows_lists_finished_cells_in_numeric_split_order(tmp_path):
    cache = uci.UCICellCache(tmp_path)
    for index in (10, 2, 0):
        cache.save("energy", index, "la_kron", {"dataset": "energy", "split": index, "method": "la_kron"})
    cache.save("energy", 1, "map", {"dataset": "energy", "split": 1, "method": "map"})
    rows = cache.rows(["energy", "yacht"], ["la_kron"])
    assert [r["split"] for r in rows] == [0, 2, 10]


def test_import_rows_adds_the_missing_cells_of_an_earlier_results_file_and_keeps_the_cached_ones(tmp_path):
    cache = uci.UCICellCache(tmp_path)
    cache.save("energy", 0, "map", {"dataset": "energy", "split": 0, "method": "map", "nll": 1.0})
    earlier = [{"dataset": "energy", "split": 0, "method": "map", "nll": 9.0},
               {"dataset": "energy", "split": 1, "method": "fiber", "nll": 2.0}]
    assert cache.import_rows(earlier) == 1
    assert cache.load("energy", 0, "map")["nll"] == 1.0  # the local cell wins
    assert cache.load("energy", 1, "fiber") == earlier[1]
    assert cache.import_rows(earlier) == 0


def test_load_rejects_a_cell_that_is_not_a_json_object(tmp_path):
    cache = uci.UCICellCache(tmp_path)
    path = cache.result_path("yacht", 0, "map")
    path.parent.mkdir(parents=True)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="delete it"):
        cache.load("yacht", 0, "map")


def test_map_model_trains_once_then_loads_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(uci, "MAP_STEPS", 4)  # a few steps: the test is about storing, not training
    split = synthetic_split()
    model, info = uci.UCICellCache(tmp_path).map_model(split)
    assert info["map_train_s"] > 0 and info["n_train"] == 40
    assert (tmp_path / "yacht" / "split_0" / "map_weights.pt").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached MAP must be loaded, not retrained")

    monkeypatch.setattr(uci, "train_uci_map", no_training)
    loaded, loaded_info = uci.UCICellCache(tmp_path).map_model(split)
    assert loaded_info["map_train_s"] == 0.0
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(model(split.x_test), loaded(split.x_test))


def test_map_config_takes_at_least_20_epochs_and_about_6000_steps():
    assert uci.map_config(455, 0).epochs == math.ceil(6000 / 15)  # 15 batches of 32 per epoch
    assert uci.map_config(45730, 0).epochs == 20
    with pytest.raises(ValueError):
        uci.map_config(0, 0)


def test_summarise_counts_splits_and_aggregates_per_dataset_and_method():
    rows = [{"dataset": "yacht", "method": "map", "split": i, "nll": nll, "rmse": rmse, "fit_s": 1.0}
            for i, (nll, rmse) in enumerate([(1.0, 0.5), (2.0, 0.7), (3.0, 0.6)])]
    rows.append({"dataset": "yacht", "method": "fiber", "split": 0, "nll": 0.4, "rmse": 0.3, "fit_s": 30.0})
    summary = uci.summarise(rows, ["yacht", "concrete"], ["map", "fiber", "scalla"])
    assert [(r["method"], r["n_splits"]) for r in summary] == [("map", 3), ("fiber", 1)]  # no empty cells
    assert summary[0]["nll"] == pytest.approx(2.0) and summary[0]["nll_se"] == pytest.approx(1 / math.sqrt(3))
    assert summary[0]["rmse"] == pytest.approx(0.6) and summary[0]["rmse_se"] == pytest.approx(0.1 / math.sqrt(3))
    assert math.isnan(summary[1]["nll_se"]) and summary[1]["fit_s"] == 30.0


def test_fiber_uci_sampler_keeps_the_flow_runs_setting_and_offers_the_library_default():
    model = torch.nn.Sequential(torch.nn.Linear(3, 50), torch.nn.ReLU(), torch.nn.Linear(50, 1))
    flow = uci.fiber_uci_sampler(model, 40, 0)
    assert flow.deform_config.kind == "flow" and flow.deform_config.flow_steps == 200
    pullback = uci.fiber_uci_sampler(model, 40, 0, deform="pullback")
    assert pullback.deform_config.kind == "pullback"
    assert pullback.config == flow.config  # the walk is the same
    with pytest.raises(ValueError, match="'flow' or 'pullback'"):
        uci.fiber_uci_sampler(model, 40, 0, deform="gaussian")
