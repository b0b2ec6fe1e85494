"""Normalisation layers' affine parameters read from the recorded inputs and output gradients (float64).

BatchNorm (eval mode, running statistics), GroupNorm and LayerNorm give their exact diagonal GGN block and glm
term from the Kronecker pass's own records (:mod:`posthoc.curvature.norm_affine`) instead of per-example
gradients through the network. Checked against the dense J Γ Jᵀ from torch.func (exact diagonal, glm covariance
with the kron posterior), and against the generic route on the same fit.
"""

import pytest
import torch
from references import DTYPE, dense_jacobians, output_hessians
from torch import nn

from posthoc.curvature import kfac
from posthoc.curvature.norm_affine import norm_gradients, norm_route_ok, normalised_input
from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.structures.kron import KronCurvature
from posthoc.network.subset import ParameterSubset


class _Normed(nn.Module):
    """Conv -> BatchNorm -> ReLU -> GroupNorm -> Linear over positions -> LayerNorm -> pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.proj = nn.Linear(4, 5)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gn(torch.relu(self.bn(self.conv(x))))  # (B, 4, 3, 3)
        tokens = self.ln(self.proj(h.flatten(2).mT))  # (B, 9, 5): LayerNorm over positions
        return self.head(torch.tanh(tokens).mean(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = _Normed().to(DTYPE)
    with torch.no_grad():  # running statistics and affine parameters away from their initial values
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        for norm in (model.bn, model.gn, model.ln):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _data(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, 2, 3, 3, generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> KronCurvature:
    def batches():
        yield x[:4], y[:4]
        yield x[4:], y[4:]

    return KronCurvature.fit(ParameterSubset(model, "all"), batches, OutputFactors("classification"),
                             progress=False)


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(3).eval(), nn.GroupNorm(1, 3), nn.LayerNorm((3, 4, 4))])
def test_norm_gradients_equal_autograd(norm):
    """∂/∂γ = Σ_l g ⊙ x̂ and ∂/∂β = Σ_l g per example, against autograd of one example at a time."""
    norm = norm.to(DTYPE)
    g = torch.Generator().manual_seed(1)
    x, cot = torch.randn(3, 3, 4, 4, generator=g, dtype=DTYPE), torch.randn(3, 3, 4, 4, generator=g, dtype=DTYPE)
    grad = (cot.reshape(3, -1, norm.weight.numel()).mT if isinstance(norm, nn.LayerNorm)
            else cot.reshape(3, 3, -1))
    weight, bias = norm_gradients(normalised_input(norm, x), grad)
    for n in range(3):
        expected = torch.autograd.grad((norm(x[n:n + 1]) * cot[n:n + 1]).sum(), [norm.weight, norm.bias])
        torch.testing.assert_close(weight[n], expected[0].reshape(-1), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(bias[n], expected[1].reshape(-1), rtol=1e-12, atol=1e-14)


def test_route_refuses_batch_statistics():
    assert norm_route_ok(nn.BatchNorm2d(3).eval())
    assert not norm_route_ok(nn.BatchNorm2d(3).train())
    assert not norm_route_ok(nn.BatchNorm2d(3, track_running_stats=False).eval())
    assert not norm_route_ok(nn.LayerNorm(3, elementwise_affine=False))
    with pytest.raises(ValueError, match="normalisation route"):
        normalised_input(nn.BatchNorm2d(3).train(), torch.zeros(2, 3, 1, 1))


def test_kron_norm_blocks_equal_dense_diagonal_and_glm():
    model = _model()
    x, y = _data()
    curv = _fit(model, x, y)
    assert [norm.name for norm in curv.norms] == ["bn", "gn", "ln"]
    subset = curv.subset
    jac = dense_jacobians(subset, x)
    exact = torch.einsum("bcp,bcd,bdp->p", jac, output_hessians(model(x).detach(), "classification"), jac)
    positions = torch.cat([torch.arange(subset.blocks[i].offset, subset.blocks[i].offset + subset.blocks[i].numel)
                           for i in curv.fallback])
    assert [subset.blocks[i].layer_name for i in curv.fallback] == ["bn", "bn", "gn", "gn", "ln", "ln"]
    torch.testing.assert_close(curv.fallback_diag, exact[positions], rtol=1e-10, atol=1e-14)
    prior, scale = torch.tensor([0.7], dtype=DTYPE), torch.tensor(1.3, dtype=DTYPE)
    expected = jac[:3] @ torch.linalg.inv(curv.dense_precision(prior, scale)) @ jac[:3].mT
    torch.testing.assert_close(curv.functional_covariance(x[:3], prior, scale), expected, rtol=1e-8, atol=1e-12)


def test_norm_route_equals_generic_route(monkeypatch):
    """The same fit with the norm route switched off (every norm block through per-example gradients)."""
    model = _model()
    x, y = _data()
    tapped = _fit(model, x, y)
    monkeypatch.setattr(kfac, "candidate_norms", lambda subset: [])
    generic = _fit(model, x, y)
    assert generic.norms == [] and generic.fallback == tapped.fallback
    torch.testing.assert_close(tapped.fallback_diag, generic.fallback_diag, rtol=1e-12, atol=1e-15)
    prior, scale = torch.tensor([0.7], dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE)
    torch.testing.assert_close(tapped.functional_covariance(x, prior, scale),
                               generic.functional_covariance(x, prior, scale), rtol=1e-10, atol=1e-14)


def test_state_dict_keeps_the_norm_route():
    model = _model()
    x, y = _data()
    curv = _fit(model, x, y)
    restored = KronCurvature.from_state_dict(curv.subset, curv.state_dict())
    assert [norm.name for norm in restored.norms] == ["bn", "gn", "ln"]
    prior, scale = torch.tensor([0.7], dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE)
    torch.testing.assert_close(restored.functional_covariance(x, prior, scale),
                               curv.functional_covariance(x, prior, scale), rtol=1e-12, atol=1e-15)


def test_diag_reads_norm_layers_without_per_example_gradients(monkeypatch):
    """The diag structure's per-layer route covers the norm layers: exact diagonal and glm, no per-example VJP."""
    from posthoc.curvature import jacobians
    from posthoc.laplace.structures.diag import DiagCurvature

    model = _model()
    x, y = _data()
    subset = ParameterSubset(model, "all")

    def refuse(*args, **kwargs):
        raise AssertionError("the generic per-example route was used")

    monkeypatch.setattr(jacobians, "per_example_factor_gradients", refuse)
    monkeypatch.setattr(jacobians, "per_example_jacobians", refuse)
    curv = DiagCurvature.fit(subset, lambda: iter([(x[:4], y[:4]), (x[4:], y[4:])]), OutputFactors("classification"),
                             progress=False)
    jac = dense_jacobians(subset, x)
    exact = torch.einsum("bcp,bcd,bdp->p", jac, output_hessians(model(x).detach(), "classification"), jac)
    torch.testing.assert_close(curv.diagonal, exact, rtol=1e-10, atol=1e-14)
    prior, scale = torch.tensor([0.7], dtype=DTYPE), torch.tensor(1.3, dtype=DTYPE)
    expected = jac[:3] @ torch.diag(curv.posterior_variance(prior, scale)) @ jac[:3].mT
    torch.testing.assert_close(curv.functional_covariance(x[:3], prior, scale), expected, rtol=1e-8, atol=1e-12)
