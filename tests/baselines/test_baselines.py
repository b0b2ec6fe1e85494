"""MAP and temperature scaling."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from posthoc.baselines import MAP, TemperatureScaling
from posthoc.baselines.temperature import fit_temperature


def test_fit_temperature_recovers_the_true_temperature():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20_000, 4, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / 2.5, -1), 1, generator=g).squeeze(-1)
    # the MLE of T from 20k draws; its sampling error here is about 0.03
    assert fit_temperature(logits, labels) == pytest.approx(2.5, abs=0.1)


def test_temperature_scaling_divides_logits():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    x = torch.randn(200, 3)
    with torch.no_grad():  # labels that depend on the logits, so a finite T is optimal
        y = torch.multinomial(torch.softmax(model(x) / 0.5, -1), 1).squeeze(-1)
    ts = TemperatureScaling(model)
    with pytest.raises(RuntimeError, match="fit"):
        ts.predict(x)
    ts.fit(DataLoader(TensorDataset(x, y), batch_size=16))
    assert 0.2 < ts.temperature < 1.0
    with torch.no_grad():
        torch.testing.assert_close(ts.predict(x).mean, model(x) / ts.temperature)
    map_pred = MAP(model).predict(x)
    assert torch.all(map_pred.var == 0)
    with pytest.raises(ValueError, match="NaN"):
        MAP(model).predict(torch.full((2, 3), float("nan")))


def test_fit_temperature_bad_input():
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="2 labels"):
        fit_temperature(torch.zeros(3, 2), torch.tensor([0, 1]))
