"""A model changed after Streamlined walked it (a plain attribute its forward reads, a replaced module) is walked
again: the graph built at the first prediction bakes both in, and the mean check ran only on its first batch."""

import pytest
import torch
from torch import nn

from posthoc.streamlined import Streamlined

pytestmark = pytest.mark.usefixtures("float64_default")


class Tempered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.act, self.head = nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)
        self.temperature = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.body(x))) / self.temperature


def _check(sp: Streamlined, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    pred = sp.predict(x)
    torch.testing.assert_close(pred.mean, model(x).detach(), rtol=1e-12, atol=1e-12)
    return pred.var


@pytest.mark.parametrize("graph", ["fx", "export"])
def test_a_changed_attribute_or_module_is_walked_again(graph):
    torch.manual_seed(0)
    model = Tempered().eval()
    x = torch.randn(4, 3)
    variances = {n: torch.full_like(p, 0.01) for n, p in model.named_parameters()}
    sp = Streamlined(model, weight_var=variances, graph=graph)
    before = _check(sp, model, x)
    model.temperature = 2.0
    torch.testing.assert_close(_check(sp, model, x), before / 4)
    model.act = nn.ReLU()
    fresh = Streamlined(model, weight_var=variances, graph=graph)
    torch.testing.assert_close(_check(sp, model, x), fresh.predict(x).var)


def test_an_empty_batch_is_a_clear_error():
    model = Tempered().eval()
    sp = Streamlined(model, weight_var={n: torch.full_like(p, 0.01) for n, p in model.named_parameters()})
    with pytest.raises(ValueError, match="no examples"):
        sp.predict(torch.randn(0, 3))
