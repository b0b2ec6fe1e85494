"""Each structure's Λ⁻¹ rhs equals a dense solve, and laplace-torch's functional_variance with it equals predict."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import posthoc

pytestmark = pytest.mark.usefixtures("float64_default")


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4),
                         nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).eval()


def _fitted(structure: str) -> posthoc.Laplace:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 5, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
    la = posthoc.Laplace(_conv_model(), "classification", subset_of_weights="all", hessian_structure=structure,
                         prior_precision=torch.tensor(0.5))
    return la.fit(DataLoader(TensorDataset(x, y), batch_size=16))


@pytest.mark.parametrize("structure", ["diag", "kron", "ekfac", "full"])
def test_solve_equals_dense_solve(structure):
    la = _fitted(structure)
    scale = la.factors.scale(la.sigma_noise)
    rhs = torch.randn(la.n_params, 4, generator=torch.Generator().manual_seed(1))
    dense = torch.linalg.solve(la.structure.dense_precision(la.prior_precision, scale), rhs)
    torch.testing.assert_close(la.structure.solve(rhs, la.prior_precision, scale), dense, rtol=1e-8, atol=1e-10)


def test_kron_functional_variance_equals_the_glm_covariance():
    la = _fitted("kron")
    x = torch.randn(6, 1, 5, 5, generator=torch.Generator().manual_seed(2))
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(la.model, p, (x,)))(
        dict(la.model.named_parameters()))
    js = torch.cat([j.reshape(6, 3, -1) for j in jac.values()], -1)
    torch.testing.assert_close(la.functional_variance(js), la.predict(x).cov, rtol=1e-8, atol=1e-10)
