"""benchmarks/defaults_large.py: the low-rank default recipe's rows and their cache, on a tiny stand-in model."""

import pytest
import torch
from benchmark_scripts import benchmark_module
from torch.utils.data import TensorDataset

from posthoc.laplace import Laplace
from posthoc.models import MLP


@pytest.fixture(scope="module")
def large():
    with benchmark_module("defaults_large") as module:
        yield module


def _tiny_task(data_dir):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 2, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = MLP(2, (8,), 3, "tanh").eval()
    ood = TensorDataset(4 * torch.randn(20, 2, generator=g), torch.zeros(20, dtype=torch.long))
    return model, {"train": TensorDataset(x, y), "test": TensorDataset(x[:30], y[:30]), "ood": ood}


def test_rows_are_the_default_recipe_and_the_fit_is_cached(large, monkeypatch, tmp_path):
    monkeypatch.setitem(large.TASKS, "tiny", _tiny_task)
    monkeypatch.setattr(large, "LOWRANK_OPTIONS", {"rank": 4, "basis": "jacobian"})
    rows = large.run_task("tiny", None, tmp_path)
    assert [r["method"] for r in rows] == ["map", "la_lowrank[probit]", "la_lowrank[probit_centred]",
                                           "la_lowrank[mc]"]
    model, data = _tiny_task(None)
    la = Laplace(model, "classification", "all", "lowrank", progress=False,
                 structure_options={"rank": 4, "basis": "jacobian"})
    la.fit(torch.utils.data.DataLoader(data["train"], batch_size=500))
    assert rows[1]["prior_precision"] == pytest.approx(float(la.optimize_prior_precision()), rel=1e-6)
    with torch.no_grad():
        assert rows[0]["nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(model(data["test"].tensors[0]),
                                                                                       data["test"].tensors[1])))
    assert (tmp_path / "tiny-lowrank.pt").is_file()
    again = large.run_task("tiny", None, tmp_path)  # from the cached fit: the same rows
    assert [{k: v for k, v in r.items() if k != "fit_s"} for r in again] == \
        [{k: v for k, v in r.items() if k != "fit_s"} for r in rows]
