"""A kron fit on layers whose outputs are not one row per example (reward modelling's pairs) says so, and those
layers get their exact diagonal GGN block: the kron posterior variances equal the diag ones there."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import posthoc

pytestmark = pytest.mark.usefixtures("float64_default")


class PairScorer(nn.Module):
    """Scores both items of each pair with one MLP run on the (2B, d) items: outputs (B, 2) logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.net(pairs.reshape(-1, pairs.shape[-1])).reshape(pairs.shape[0], 2)


def test_kron_on_pair_items_warns_and_equals_the_exact_diagonal():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 2, 3, generator=g), torch.randint(0, 2, (24,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = PairScorer()
    with pytest.warns(UserWarning, match="not one row per example"):
        kron = posthoc.Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron").fit(loader)
    diag = posthoc.Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag").fit(loader)
    torch.testing.assert_close(kron.posterior_variance(), diag.posterior_variance(), rtol=1e-10, atol=1e-12)


def test_last_layer_on_pair_items_matches_a_dense_reference():
    """The last layer runs on the (2B, d) items: its tail is re-run, and the last-layer posterior equals a dense
    reference built from the Jacobian of the (B, 2) outputs w.r.t. the head's weights."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 2, 3, generator=g), torch.randint(0, 2, (16,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = PairScorer()
    la = posthoc.Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="full")
    la.fit(loader)
    head = model.net[2]
    params = {"weight": head.weight.detach(), "bias": head.bias.detach()}

    def logits(p: dict, inputs: torch.Tensor) -> torch.Tensor:
        feats = model.net[1](model.net[0](inputs.reshape(-1, 3)))
        return torch.func.functional_call(head, p, (feats,)).reshape(inputs.shape[0], 2)

    jac = torch.func.jacrev(logits)(params, x)
    jac = torch.cat([jac["weight"].reshape(16, 2, -1), jac["bias"].reshape(16, 2, -1)], -1)  # (B, C, P)
    probs = torch.softmax(logits(params, x), -1)
    gamma = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
    ggn = torch.einsum("bcp,bcd,bdq->pq", jac, gamma, jac)
    precision = ggn + la.prior_precision * torch.eye(ggn.shape[0])
    x_new = torch.randn(5, 2, 3, generator=g)
    j_new = torch.func.jacrev(logits)(params, x_new)
    j_new = torch.cat([j_new["weight"].reshape(5, 2, -1), j_new["bias"].reshape(5, 2, -1)], -1)
    reference = j_new @ torch.linalg.solve(precision, j_new.transpose(1, 2))
    pred = la.predict(x_new)
    torch.testing.assert_close(pred.mean, model(x_new))
    torch.testing.assert_close(pred.cov, reference, rtol=1e-8, atol=1e-10)
