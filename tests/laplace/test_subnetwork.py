"""Subnetwork Laplace: selection by largest diagonal-LA variance, and the posterior over it."""

import torch
from references import dense_ggn, small_mlp
from torch.utils.data import DataLoader, TensorDataset

from posthoc import Laplace
from posthoc.laplace.subnetwork import largest_variance_indices


def test_largest_variance_selection_and_subnetwork_posterior(classification_data):
    x, y = classification_data
    model = small_mlp()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    idx = largest_variance_indices(model, loader, "classification", 10, prior_precision=1.0, progress=False)
    diag = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag",
                   progress=False).fit(loader)
    variance = diag.posterior_variance()
    assert idx.numel() == 10 and torch.all(idx[1:] > idx[:-1])
    assert float(variance[idx].min()) >= float(variance[torch.ones_like(variance, dtype=torch.bool).index_fill(0, idx, False)].max())

    sub = Laplace(model, "classification", subset_of_weights="subnetwork", hessian_structure="full",
                  subnetwork_indices=idx, progress=False).fit(loader)
    full_h = dense_ggn(Laplace(model, "classification", subset_of_weights="all", hessian_structure="full").subset,
                       x, "classification")
    torch.testing.assert_close(sub.curvature.hessian, full_h[idx][:, idx])
    # predictions only vary through the chosen weights: samples keep the rest at the MAP
    thetas = sub.sample(3, seed=0)
    assert thetas.shape == (3, 10)
    pred = sub.predict(x[:4])
    assert pred.cov.shape == (4, 3, 3) and bool(torch.all(torch.linalg.eigvalsh(pred.cov) > -1e-12))
