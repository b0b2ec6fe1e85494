"""A 1,315-parameter tanh MLP (4 inputs, 3 classes, 400 points) where the exact NTK and LLA are computable."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from posthoc.data.loaders import make_loader
from posthoc.laplace.function_space import exact_lla
from posthoc.network.subset import ParameterSubset

DTYPE = torch.float64


@dataclass
class Problem:
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    x_ood: torch.Tensor
    x_context: torch.Tensor
    train_loader: object
    context_loader: object
    val_loader: object

    def exact_var(self, points: torch.Tensor, prior: float = 1.0) -> torch.Tensor:
        return exact_lla(ParameterSubset(self.model, "all"), self.x, points, "classification", prior).var


@pytest.fixture(scope="session")
def mlp_problem() -> Problem:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 4, generator=g, dtype=DTYPE) * 2
    y = torch.arange(400) % 3
    x = centers[y] + torch.randn(400, 4, generator=g, dtype=DTYPE)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)).to(DTYPE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    x_test = centers[torch.arange(60) % 3] + torch.randn(60, 4, generator=g, dtype=DTYPE)
    x_ood = torch.rand(60, 4, generator=g, dtype=DTYPE) * 16 - 8  # the box the context points come from
    x_context = torch.rand(3000, 4, generator=g, dtype=DTYPE) * 16 - 8
    y_val = torch.arange(150) % 3
    x_val = centers[y_val] + torch.randn(150, 4, generator=g, dtype=DTYPE)
    return Problem(model, x, y, x_test, x_ood, x_context,
                   make_loader(TensorDataset(x, y), 100, shuffle=True, seed=0),
                   make_loader(TensorDataset(x_context, torch.zeros(len(x_context), dtype=torch.long)), 100,
                               shuffle=True, seed=1),
                   make_loader(TensorDataset(x_val, y_val), 150, shuffle=False))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """These tests run many tiny ops: on a shared 2-core machine two intra-op threads only contend (10x slower
    under load). One thread for the ScaLLA tests, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
