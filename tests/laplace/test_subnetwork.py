"""Subnetwork Laplace: selection by largest diagonal-LA variance, and the posterior over it."""

import pytest
import torch
from references import dense_ggn, small_mlp
from torch.utils.data import DataLoader, TensorDataset

from posthoc import Laplace
from posthoc.laplace.subnetwork import (
    LargestMagnitudeSubnetMask,
    LargestVarianceDiagLaplaceSubnetMask,
    LargestVarianceSWAGSubnetMask,
    LastLayerSubnetMask,
    ModuleNameSubnetMask,
    ParamNameSubnetMask,
    RandomSubnetMask,
    largest_variance_indices,
)


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
    torch.testing.assert_close(sub.structure.hessian, full_h[idx][:, idx])
    # predictions only vary through the chosen weights: samples keep the rest at the MAP
    thetas = sub.sample(3, seed=0)
    assert thetas.shape == (3, 10)
    pred = sub.predict(x[:4])
    assert pred.cov.shape == (4, 3, 3) and bool(torch.all(torch.linalg.eigvalsh(pred.cov) > -1e-12))


# ---------------------------------------------------------------- laplace-torch's subnetwork masks
def _offsets(model):
    """name -> slice of the trainable parameters_to_vector order (the reference for the masks)."""
    out, offset = {}, 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            out[name] = slice(offset, offset + param.numel())
            offset += param.numel()
    return out


def _positions(model, names):
    offsets = _offsets(model)
    return torch.cat([torch.arange(offsets[n].start, offsets[n].stop) for n in names])


def test_name_and_last_layer_masks_select_the_named_tensors(classification_data):
    x, y = classification_data
    model = small_mlp()
    model[2].weight.requires_grad_(False)  # frozen tensors are not counted, as in subnetwork_indices
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    idx = ParamNameSubnetMask(model, ["0.bias", "4.weight"]).select()
    assert idx.dtype == torch.long and torch.equal(idx, _positions(model, ["0.bias", "4.weight"]))
    assert torch.equal(ModuleNameSubnetMask(model, ["2"]).select(), _positions(model, ["2.bias"]))
    assert torch.equal(ModuleNameSubnetMask(model, ["0", "4"]).select(),
                       _positions(model, ["0.weight", "0.bias", "4.weight", "4.bias"]))
    last = LastLayerSubnetMask(model).select(loader)
    assert torch.equal(last, _positions(model, ["4.weight", "4.bias"]))
    assert torch.equal(LastLayerSubnetMask(model, last_layer_name="0").select(), _positions(model, ["0.weight", "0.bias"]))
    # the indices feed subnetwork_indices: the covered weights are exactly those tensors
    sub = Laplace(model, "classification", subset_of_weights="subnetwork", hessian_structure="diag",
                  subnetwork_indices=last, progress=False).fit(loader)
    torch.testing.assert_close(sub.subset.theta_map, torch.cat([model[4].weight.reshape(-1), model[4].bias]).detach())
    for bad, match in ((ParamNameSubnetMask(model, ["2.weight"]), "do not require grad"),
                       (ParamNameSubnetMask(model, ["nope"]), "not in the model"),
                       (ModuleNameSubnetMask(model, [""]), "has children"),
                       (ModuleNameSubnetMask(model, ["1"]), "no parameters that require grad"),
                       (LastLayerSubnetMask(model), "needs train_loader")):
        with pytest.raises(ValueError, match=match):
            bad.select()
    mask = ParamNameSubnetMask(model, ["0.bias"])
    mask.select()
    assert mask.n_params_subnet == 5
    with pytest.raises(ValueError, match="already selected"):
        mask.select()
    with pytest.raises(AttributeError, match="select"):
        _ = ParamNameSubnetMask(model, ["0.bias"]).indices


def test_score_based_masks_pick_the_top_scores(classification_data):
    x, y = classification_data
    model = small_mlp()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    idx = LargestMagnitudeSubnetMask(model, 7).select()
    assert torch.equal(idx, torch.topk(theta.abs(), 7).indices.sort().values)
    first = RandomSubnetMask(model, 6, generator=torch.Generator().manual_seed(0)).select()
    again = RandomSubnetMask(model, 6, generator=torch.Generator().manual_seed(0)).select()
    assert torch.equal(first, again) and first.numel() == 6 and torch.all(first[1:] > first[:-1])
    diag = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag", progress=False)
    variance_idx = LargestVarianceDiagLaplaceSubnetMask(model, 10, diag).select(loader)
    assert torch.equal(variance_idx, largest_variance_indices(model, loader, "classification", 10, progress=False))
    swag = LargestVarianceSWAGSubnetMask(model, 5, "classification", swag_n_snapshots=3, swag_lr=0.05)
    swag_idx = swag.select(loader)
    assert swag_idx.numel() == 5
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector(model.parameters()).detach(), theta)  # untouched
    assert torch.equal(swag_idx, torch.topk(swag._param_scores, 5).indices.sort().values)
    assert float(swag._param_scores.max()) > 0
    with pytest.raises(ValueError, match="exceeds"):
        LargestMagnitudeSubnetMask(model, theta.numel() + 1)
    with pytest.raises(ValueError, match="needs train_loader"):
        LargestVarianceDiagLaplaceSubnetMask(model, 3, diag).select()
    with pytest.raises(ValueError, match="0/1 entry"):
        LargestMagnitudeSubnetMask(model, 3).convert_subnet_mask_to_indices(torch.ones(3, dtype=torch.bool))
