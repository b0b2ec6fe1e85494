"""A kron fit on layers whose outputs are not one row per example (reward modelling's pairs) says so, and those
layers get their exact diagonal GGN block: the kron posterior variances equal the diag ones there."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import posthoc

pytestmark = pytest.mark.usefixtures("float64_default")


class PairScorer(nn.Module):
    """Scores both items of each pair with one MLP run on the (2B, d) items: outputs (B, 2) logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.net(pairs.reshape(-1, pairs.shape[-1])).reshape(pairs.shape[0], 2)


def test_kron_on_pair_items_warns_and_equals_the_exact_diagonal():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 2, 3, generator=g), torch.randint(0, 2, (24,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = PairScorer()
    with pytest.warns(UserWarning, match="not one row per example"):
        kron = posthoc.Laplace(model, "classification", hessian_structure="kron").fit(loader)
    diag = posthoc.Laplace(model, "classification", hessian_structure="diag").fit(loader)
    torch.testing.assert_close(kron.posterior_variance(), diag.posterior_variance(), rtol=1e-10, atol=1e-12)
