"""``la.posterior_precision`` for hessian_structure="kron": laplace-torch's KronDecomposed surface, in float64.

The reference is posthoc's own dense block-diagonal precision of the fitted structure (``dense_precision``), which
tests/laplace checks against brute-force GGNs; benchmarks/laplace_torch_flows.py compares with laplace-torch.
"""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from posthoc.compat.laplace import Laplace
from posthoc.compat.laplace.utils import KronDecomposed
from posthoc.compat.laplace.utils.matrix import KronDecomposed as MatrixKronDecomposed

DTYPE = torch.float64


def _fitted_structure(la):
    attrs = vars(la)
    return attrs["structure"] if "structure" in attrs else attrs["curvature"]


class _NormNet(nn.Module):
    """Linear - LayerNorm - Tanh - Linear: the LayerNorm's two tensors are posthoc's exact diagonal fallback."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, n_out)).to(DTYPE)
        with torch.no_grad():  # a non-trivial LayerNorm, so its diagonal block is not the default one
            self.body[1].weight.uniform_(0.5, 1.5)
            self.body[1].bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _fit(likelihood, structure="kron", model=None, **kwargs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (24,), generator=g) if likelihood == "classification" else torch.randn(24, 2, generator=g,
                                                                                                  dtype=DTYPE)
    model = _NormNet(3 if likelihood == "classification" else 2) if model is None else model
    la = Laplace(model, likelihood, "all", structure, **kwargs)
    return la.fit(DataLoader(TensorDataset(x, y), batch_size=8))


def _dense(la):
    return _fitted_structure(la).dense_precision(la.prior_precision, la.factors.scale(la.sigma_noise))


@pytest.mark.parametrize(("likelihood", "options"), [
    ("classification", {"prior_precision": torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0], dtype=DTYPE)}),
    ("regression", {"prior_precision": 0.8, "sigma_noise": 0.6, "temperature": 0.5}),
])
def test_kron_posterior_precision_against_the_dense_precision(likelihood, options):
    la = _fit(likelihood, **options)
    precision = la.posterior_precision
    dense = _dense(la)
    cov = torch.linalg.inv(dense)
    assert isinstance(precision, KronDecomposed) and MatrixKronDecomposed is KronDecomposed
    assert len(precision) == 6 and precision.damping is False
    torch.testing.assert_close(precision.deltas, la.prior_precision.expand(6))
    torch.testing.assert_close(precision.to_matrix(), dense)
    torch.testing.assert_close(precision.to_matrix(-1), cov)
    torch.testing.assert_close(precision.logdet(), torch.logdet(dense))
    torch.testing.assert_close(la.log_det_posterior_precision, torch.logdet(dense))
    torch.testing.assert_close(precision.diag(), torch.diagonal(dense))
    torch.testing.assert_close(precision.diag(-1), torch.diagonal(cov))
    w = torch.randn(2, 3, la.n_params, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    torch.testing.assert_close(precision.bmm(w), w @ cov)
    torch.testing.assert_close(precision.bmm(w, exponent=1), w @ dense)
    torch.testing.assert_close(precision.bmm(w[0]), w[0] @ cov)  # (N, P) and (P,) keep their shapes
    torch.testing.assert_close(precision.bmm(w[0, 0], exponent=1), dense @ w[0, 0])
    root = precision.bmm(w, exponent=-0.5)
    torch.testing.assert_close(root @ root.mT, w @ cov @ w.mT)
    torch.testing.assert_close(precision.inv_square_form(w), w @ cov @ w.mT)
    torch.testing.assert_close(la.functional_variance(w), w @ cov @ w.mT)
    values = la.mean + 0.1 * w[0]
    torch.testing.assert_close(la.square_norm(values), (((values - la.mean) @ dense) * (values - la.mean)).sum(-1))


def test_eigenvectors_and_eigenvalues_rebuild_each_block():
    la = _fit("classification", prior_precision=0.7)
    precision = la.posterior_precision
    blocks = []
    for vectors, values, delta in zip(precision.eigenvectors, precision.eigenvalues, precision.deltas, strict=True):
        if len(vectors) == 2:  # a weight: Q_out ⊗ Q_in and the outer product of the factors' eigenvalues
            basis, spectrum = torch.kron(*vectors), torch.outer(*values).reshape(-1)
        else:
            basis, spectrum = vectors[0], values[0]
        blocks.append((basis * (spectrum + delta)) @ basis.T)
    torch.testing.assert_close(torch.block_diag(*blocks), _dense(la))
    shapes = [[tuple(v.shape) for v in vectors] for vectors in precision.eigenvectors]
    assert shapes == [[(4, 4), (3, 3)], [(4, 4)], [(4, 4)], [(4, 4)], [(3, 3), (4, 4)], [(3, 3)]]


def test_scalar_multiplication_scales_the_curvature_and_addition_the_deltas():
    la = _fit("classification", prior_precision=0.7)
    precision, dense = la.posterior_precision, _dense(la)
    prior = torch.diag(la.prior_precision_diag)
    for scaled in (precision * 3.0, 3 * precision, precision * torch.tensor([3.0], dtype=DTYPE)):
        torch.testing.assert_close(scaled.to_matrix(), 3 * (dense - prior) + prior)  # the deltas stay, as there
    per_tensor = torch.arange(1.0, 7.0, dtype=DTYPE)
    shifted = precision + per_tensor
    torch.testing.assert_close(shifted.deltas, 0.7 + per_tensor)
    torch.testing.assert_close((torch.tensor(0.2, dtype=DTYPE) + precision).to_matrix(),
                               dense + 0.2 * torch.eye(la.n_params, dtype=DTYPE))
    torch.testing.assert_close(precision.to_matrix(), dense)  # the operands are unchanged
    with pytest.raises(ValueError, match="one delta per parameter tensor"):
        precision + torch.ones(4, dtype=DTYPE)
    with pytest.raises(ValueError, match="multiplied by a scalar only"):
        precision * torch.ones(2, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"W must be \(P,\)"):
        precision.bmm(torch.ones(1, 1, 1, la.n_params, dtype=DTYPE))


def test_logdet_is_differentiable_in_the_deltas_and_the_factor():
    la = _fit("regression", prior_precision=0.8, sigma_noise=0.6)
    delta = torch.tensor(0.8, dtype=DTYPE, requires_grad=True)
    factor = torch.tensor(1.5, dtype=DTYPE, requires_grad=True)
    (la.posterior_precision.detach() * factor + (delta - 0.8)).logdet().backward()
    # Lambda = c s H + delta I: d/d delta log det = tr(Lambda^-1), d/dc = tr(Lambda^-1 s H)
    curvature = _dense(la) - 0.8 * torch.eye(la.n_params, dtype=DTYPE)  # s H
    lam = 1.5 * curvature + 0.8 * torch.eye(la.n_params, dtype=DTYPE)
    torch.testing.assert_close(delta.grad, torch.trace(torch.linalg.inv(lam)))
    torch.testing.assert_close(factor.grad, torch.trace(torch.linalg.solve(lam, curvature)))


def test_ekfac_gives_the_object_without_factor_eigenvalues():
    la = _fit("classification", "ekfac", prior_precision=0.7)
    precision = la.posterior_precision
    torch.testing.assert_close(precision.to_matrix(), _dense(la))
    torch.testing.assert_close(precision.logdet(), torch.logdet(_dense(la)))
    with pytest.raises(NotImplementedError, match="eigenvalue_matrices"):
        _ = precision.eigenvalues
    assert [tuple(m.shape) for m in precision.eigenvalue_matrices][:2] == [(4, 3), (4,)]


def test_kron_has_no_posterior_covariance_or_scale_as_in_laplace_torch():
    la = _fit("classification", prior_precision=0.7)
    for name in ("posterior_covariance", "posterior_scale"):  # laplace-torch's KronLaplace has neither
        with pytest.raises(NotImplementedError, match=f"{name} is not available for hessian_structure='kron'"):
            getattr(la, name)


class _Conv1DNet(nn.Module):
    """transformers' Conv1D (weights stored (D_in, D_out)) - Tanh - Conv1D over (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
        torch.manual_seed(0)
        self.up, self.down = conv1d(5, 3).to(DTYPE), conv1d(3, 5).to(DTYPE)
        with torch.no_grad():
            for layer in (self.up, self.down):
                layer.weight.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def test_transposed_conv1d_weights_in_their_storage_layout():
    la = _fit("classification", model=_Conv1DNet(), prior_precision=0.4)
    precision, dense = la.posterior_precision, _dense(la)
    torch.testing.assert_close(precision.to_matrix(), dense)
    w = torch.randn(2, 3, la.n_params, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    torch.testing.assert_close(precision.bmm(w), w @ torch.linalg.inv(dense))
    torch.testing.assert_close(precision.diag(), torch.diagonal(dense))
    assert [tuple(v.shape) for v in precision.eigenvectors[0]] == [(3, 3), (5, 5)]  # rows of the stored (3, 5)
