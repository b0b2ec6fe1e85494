"""Full structure: curvature equals the dense references (float64)."""

import pytest
import torch
from references import dense_ef, dense_ggn, minibatches, small_cnn, small_mlp

from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.structures.full import FullCurvature
from posthoc.network.subset import ParameterSubset


def _fit(subset, x, y, likelihood, curvature="ggn"):
    return FullCurvature.fit(subset, minibatches(subset, x, y), OutputFactors(likelihood, curvature), progress=False)


@pytest.mark.parametrize("subset_kind", ["all", "last_layer"])
def test_full_ggn_classification(classification_data, subset_kind):
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), subset_kind)
    curv = _fit(subset, x, y, "classification")
    torch.testing.assert_close(curv.hessian, dense_ggn(subset, subset.inputs(x), "classification"), rtol=1e-10, atol=1e-12)


def test_full_ggn_regression_and_ef(regression_data):
    x, y = regression_data
    subset = ParameterSubset(small_mlp(n_out=1), "all")
    torch.testing.assert_close(_fit(subset, x, y, "regression").hessian, dense_ggn(subset, x, "regression"))
    torch.testing.assert_close(_fit(subset, x, y, "regression", "ef").hessian, dense_ef(subset, x, y, "regression"))


def test_full_ggn_cnn_and_ef(image_data):
    x, y = image_data
    subset = ParameterSubset(small_cnn(), "all")
    torch.testing.assert_close(_fit(subset, x, y, "classification").hessian, dense_ggn(subset, x, "classification"))
    torch.testing.assert_close(_fit(subset, x, y, "classification", "ef").hessian,
                               dense_ef(subset, x, y, "classification"))


def test_mc_ggn_is_unbiased(classification_data):
    x, y = classification_data
    subset = ParameterSubset(small_mlp(), "last_layer")
    exact = dense_ggn(subset, subset.inputs(x), "classification")
    def batches():
        yield subset.inputs(x), y
    mc = FullCurvature.fit(subset, batches, OutputFactors("classification", "ggn_mc", mc_samples=4000, seed=0),
                           progress=False).hessian
    # relative Frobenius error of a 4000-sample MC estimate: O(1/sqrt(4000)) ~ 0.016
    assert float((mc - exact).norm() / exact.norm()) < 0.05


def test_subnetwork_is_a_submatrix(classification_data):
    x, y = classification_data
    model = small_mlp()
    full = _fit(ParameterSubset(model, "all"), x, y, "classification").hessian
    idx = torch.tensor([0, 5, 17, 30, 44, 61])
    sub = _fit(ParameterSubset(model, "subnetwork", subnetwork_indices=idx), x, y, "classification").hessian
    torch.testing.assert_close(sub, full[idx][:, idx])
