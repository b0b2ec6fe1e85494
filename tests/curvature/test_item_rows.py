"""KFAC's item_rows option (laplace-torch's factors for a layer run on the items of each example): its guards."""

import pytest
import torch
from torch import nn

from posthoc.curvature.kfac import KFACApproximation, kfac_factors
from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.structures.ekfac import EKFACCurvature
from posthoc.laplace.structures.kron import KronCurvature
from posthoc.network.subset import ParameterSubset


class _Items(nn.Module):
    """Pairs (B, 2, 3) -> a Linear on the (2B, 3) items -> logits (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(-1, 3)).reshape(x.shape[0], 2)


def _batches():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(4, 2, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (4,), generator=g)


def test_item_rows_are_kronecker_factors_with_the_rows_as_examples():
    subset = ParameterSubset(_Items(), "all")
    result = kfac_factors(subset, _batches(), OutputFactors("classification"), progress=False, item_rows=True)
    assert [layer.name for layer in result.layers] == ["net"] and result.fallback == []
    x, _ = next(_batches())
    rows = x.reshape(-1, 3)
    torch.testing.assert_close(result.input_factors["net"], rows.T @ rows / x.shape[0], rtol=1e-12, atol=1e-14)


def test_item_rows_refuses_reduce_and_other_structures():
    subset = ParameterSubset(_Items(), "all")
    with pytest.raises(ValueError, match="reduce"):
        kfac_factors(subset, _batches(), OutputFactors("classification"), KFACApproximation.REDUCE, progress=False,
                     item_rows=True)
    with pytest.raises(TypeError, match="item_rows"):
        KronCurvature.fit(subset, _batches, OutputFactors("classification"), progress=False, item_rows="yes")
    with pytest.raises(TypeError, match="kfac_approx"):
        EKFACCurvature.fit(subset, _batches, OutputFactors("classification"), progress=False, item_rows=True)
