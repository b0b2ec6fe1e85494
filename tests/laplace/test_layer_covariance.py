"""The per-layer covariance view equals the matching blocks of the dense posterior covariance, at the current prior."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import posthoc
from posthoc.laplace.layer_covariance import layer_covariances

pytestmark = pytest.mark.usefixtures("float64_default")


def _fitted(structure: str, subset: str = "all") -> posthoc.Laplace:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(40, 3)
    y = torch.randint(0, 3, (40,))
    la = posthoc.Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure,
                         prior_precision=0.7)
    return la.fit(DataLoader(TensorDataset(x, y), batch_size=16))


def _dense_blocks(la: posthoc.Laplace) -> dict[tuple[str, str], torch.Tensor]:
    scale = la.factors.scale(la.sigma_noise)
    cov = torch.linalg.inv(la.structure.dense_precision(la.prior_precision, scale))
    return {(b.layer_name, b.kind): cov[b.slice, b.slice] for b in la.subset.blocks}


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize("prior", [0.7, 5.0])
def test_view_equals_dense_blocks(structure, prior):
    la = _fitted(structure)
    la.prior_precision = prior  # changed after the fit: the view reads the current prior
    dense = _dense_blocks(la)
    view = layer_covariances(la)
    assert set(view) == {name for name, _ in dense}
    for (name, kind), block in dense.items():
        layer = view[name]
        if structure == "diag":
            torch.testing.assert_close(layer.diag[kind].reshape(-1), torch.diagonal(block), rtol=1e-10, atol=1e-12)
        elif structure == "kron":
            factor = layer.kron[kind]
            basis = factor.q_out if factor.q_in is None else torch.kron(factor.q_out, factor.q_in)
            torch.testing.assert_close((basis * factor.inv.reshape(-1)) @ basis.T, block, rtol=1e-8, atol=1e-10)
        else:
            kinds, cov = layer.full
            sizes = [dict(la.subset.module.named_modules())[name].get_parameter(k).numel() for k in kinds]
            start = sum(sizes[:kinds.index(kind)])
            part = cov[start:start + sizes[kinds.index(kind)], start:start + sizes[kinds.index(kind)]]
            torch.testing.assert_close(part, block, rtol=1e-8, atol=1e-10)


def test_last_layer_view_is_keyed_by_the_last_layer_module():
    la = _fitted("kron", "last_layer")
    view = layer_covariances(la)
    assert list(view) == [""]  # names relative to la.subset.module, the last Linear itself
    assert set(view[""].kron) == {"weight", "bias"}


def test_unfitted_and_unsupported_raise():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="call fit"):
        layer_covariances(posthoc.Laplace(model, "classification", hessian_structure="diag"))
    la = _fitted("lowrank")
    with pytest.raises(ValueError, match="diag, kron, ekfac and full"):
        layer_covariances(la)
