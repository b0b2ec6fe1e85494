"""The position-pair route of the diag curvature and its glm grams equals the direct route and the dense reference.

A Conv2d layer's per-example gradient is sum_l g_l a_l^T over its L positions. For layers with few positions
(late stages of a ResNet) the diag fit and the diag glm predictive sum over position pairs instead of forming the
(K, b, O, I) per-example gradients (posthoc.curvature.jacobians.position_pairs_cheaper). Both routes, forced in turn on a
network with a many-position and a few-position conv, are checked in float64 against jacrev's dense J.
"""

import pytest
import torch
from references import DTYPE, dense_ggn, dense_jacobians, minibatches
from torch import nn

from posthoc.curvature import jacobians
from posthoc.curvature.jacobians import factor_gradient_squares, per_example_weighted_grams
from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.structures import kron
from posthoc.laplace.structures.ekfac import EKFACCurvature
from posthoc.laplace.structures.kron import KronCurvature
from posthoc.network.subset import ParameterSubset


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),  # 6×6: 36 positions
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Tanh(),  # 3×3: 9 positions
        nn.Flatten(), nn.Linear(36, 3),
    ).to(DTYPE).eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, 2, 6, 6, generator=g, dtype=DTYPE), torch.randint(0, 3, (5,), generator=g)


@pytest.fixture(params=["pairs", "direct", "auto"])
def route(request, monkeypatch):
    if request.param != "auto":
        def forced(n_positions: int, n_cot: int) -> bool:
            return request.param == "pairs"

        monkeypatch.setattr(jacobians, "position_pairs_cheaper", forced)
        monkeypatch.setattr(kron, "position_pairs_cheaper", forced)
    return request.param


def test_rule_takes_pairs_only_for_few_positions():
    assert jacobians.position_pairs_cheaper(16, 10)  # a 4×4 map, 10 classes: measured 8.6× faster
    assert not jacobians.position_pairs_cheaper(64, 10)  # 8×8: measured 0.35×
    assert not jacobians.position_pairs_cheaper(16, 1)  # one MC sample: no pairs


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_diag_curvature_equals_dense_ggn(route, likelihood):
    model = _model()
    if likelihood == "regression":
        model[-1] = nn.Linear(36, 2).to(DTYPE)
    x, y = _data()
    if likelihood == "regression":
        y = torch.randn(5, 2, dtype=DTYPE)
    subset = ParameterSubset(model, "all")
    factors = OutputFactors(likelihood)
    diagonal = factor_gradient_squares(subset, x, factors(model(x), y), chunk_bytes=4000)  # several chunks
    torch.testing.assert_close(diagonal, torch.diagonal(dense_ggn(subset, x, likelihood)), rtol=1e-10, atol=1e-14)


def test_weighted_grams_equal_dense_and_their_gradient(route):
    model = _model()
    x, _ = _data()
    subset = ParameterSubset(model, "all")
    g = torch.Generator().manual_seed(8)
    weights = (0.1 + torch.rand(subset.n_params, generator=g, dtype=DTYPE)).requires_grad_()
    grams = per_example_weighted_grams(subset, x, weights, chunk_bytes=4000)
    jac = dense_jacobians(subset, x)  # (B, C, P)
    dense = torch.einsum("bcp,p,bdp->bcd", jac, weights, jac)
    torch.testing.assert_close(grams, dense, rtol=1e-10, atol=1e-14)
    probe = torch.randn(grams.shape, generator=g, dtype=DTYPE)
    (grad,) = torch.autograd.grad((grams * probe).sum(), weights)
    torch.testing.assert_close(grad, torch.einsum("bcd,bcp,bdp->p", probe, jac, jac), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("cls", [KronCurvature, EKFACCurvature])
def test_kronecker_glm_covariance_equals_dense(route, cls):
    model = _model()
    x, y = _data()
    subset = ParameterSubset(model, "all")
    curv = cls.fit(subset, minibatches(subset, x, y, batch=2), OutputFactors("classification"), progress=False)
    prior, scale = torch.tensor([0.8], dtype=DTYPE), torch.tensor(1.3, dtype=DTYPE)
    jac = dense_jacobians(subset, x)
    expected = jac @ torch.linalg.inv(curv.dense_precision(prior, scale)) @ jac.mT
    torch.testing.assert_close(curv.functional_covariance(x, prior, scale), expected, rtol=1e-10,
                               atol=1e-12 * float(expected.abs().max()))
