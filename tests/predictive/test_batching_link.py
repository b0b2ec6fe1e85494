"""Joining or rescaling Gaussian predictives keeps their default link, so probs() does not change formula."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from posthoc.laplace import Laplace
from posthoc.predictive import GaussianPredictive
from posthoc.predictive.batching import concat, predict_loader
from posthoc.predictive.scale import scale_predictive

DTYPE = torch.float64


def _predictives(link):
    torch.manual_seed(0)
    mean = torch.randn(5, 3, dtype=DTYPE)
    a = torch.randn(5, 3, 3, dtype=DTYPE)
    cov = a @ a.transpose(1, 2)
    return (GaussianPredictive(mean, cov=cov, link_approx=link), GaussianPredictive(mean, var=cov.diagonal(0, 1, 2),
                                                                                    link_approx=link),
            GaussianPredictive(mean, var=torch.rand(5, 3, dtype=DTYPE), cov_factor=a[..., :2], link_approx=link))


@pytest.mark.parametrize("form", [0, 1, 2])
def test_concat_and_scale_keep_the_default_link(form):
    pred = _predictives("probit_centred")[form]
    joined = concat([pred, pred])
    assert joined.link_approx.value == "probit_centred"
    torch.testing.assert_close(joined.probs()[:5], pred.probs(), rtol=0, atol=0)
    scaled = scale_predictive(pred, 1.0)
    assert scaled.link_approx.value == "probit_centred"
    torch.testing.assert_close(scaled.probs(), pred.probs())


def test_concat_refuses_parts_with_different_links():
    with pytest.raises(ValueError, match="different default links"):
        concat([_predictives("probit")[0], _predictives("probit_centred")[0]])


def test_a_laplace_scored_over_a_loader_gives_la_x():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE)
    x, y = torch.randn(40, 2, dtype=DTYPE), torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    la = Laplace(model, "classification", "all", "full", prior_precision=0.05, progress=False).fit(loader)
    pred, targets = predict_loader(la.predict, loader)
    torch.testing.assert_close(pred.probs(), la(x))
    assert torch.equal(targets, y)
