"""laplace-torch's ``likelihood="reward_modeling"`` with ``subset_of_weights="last_layer"`` on posthoc (float64).

Two ways to write the same reward model: ``FlatPairs`` runs its network on the (2B, d) items of B pairs (as
laplace-torch's tests do), ``PairAxis`` on the (B, 2, d) pairs themselves, squeezing the reward axis (its last
layer's tail on pairs is a fixed linear map that single items do not take). References: the Bradley-Terry GGN
sum_n J_n^T (diag p_n - p_n p_n^T) J_n and the reward's J Sigma J^T from torch.func.jacrev of the last layer's
(weight, bias), no library code.
"""

import pytest
import torch
from references import DTYPE, reward_pairs
from references import PairRewardNet as FlatPairs
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from posthoc.compat.laplace import Laplace

LAST = "net.2"


class PairAxis(FlatPairs):
    """The same network on (B, 2, d) pairs directly: (B, 2, 1) squeezed to logits (B, 2); items give (B, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.squeeze(-1) if x.ndim == 3 else out


def _loader(batch_size: int = 5) -> DataLoader:
    return DataLoader(TensorDataset(*reward_pairs()), batch_size=batch_size)


def _items() -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)


def _last_layer_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J (B, C, 7) of model(x) in the last layer's (weight (1, 6), bias (1,)), by jacrev over the whole batch."""
    layer = model.get_submodule(LAST)
    assert isinstance(layer, nn.Linear)
    theta = torch.cat([layer.weight.detach().reshape(-1), layer.bias.detach()])

    def f(th: torch.Tensor) -> torch.Tensor:
        params = {f"{LAST}.weight": th[:6].reshape(1, 6), f"{LAST}.bias": th[6:]}
        return functional_call(model, params, (x,))

    return jacrev(f)(theta).detach()


def _bradley_terry_ggn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sum_n J_n^T (diag p_n - p_n p_n^T) J_n (7, 7), p_n the pair's softmax over its two rewards."""
    jac = _last_layer_jacobian(model, x)  # (B, 2, 7)
    p = torch.softmax(model(x).detach(), -1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("bcp,bck,bkq->pq", jac, lam, jac)


def _dense_precision(la: Laplace) -> torch.Tensor:
    precision = la.posterior_precision
    if hasattr(precision, "to_matrix"):
        return precision.to_matrix()
    return torch.diag(precision) if precision.ndim == 1 else precision


@pytest.mark.parametrize("model_class", [FlatPairs, PairAxis])
def test_last_layer_full_is_the_bradley_terry_ggn_and_the_reward_variance_is_j_sigma_jt(model_class):
    model = model_class()
    x, _ = reward_pairs()
    la = Laplace(model, "reward_modeling", "last_layer", "full", prior_precision=0.5).fit(_loader())
    assert la.subset.last_layer_name == LAST
    eye = torch.eye(7, dtype=DTYPE)
    torch.testing.assert_close(la.posterior_precision - 0.5 * eye, _bradley_terry_ggn(model, x), rtol=1e-10,
                               atol=1e-12)
    # a shared shift of both rewards leaves the preference unchanged: the bias has no curvature
    torch.testing.assert_close(la.posterior_precision[-1], 0.5 * eye[-1], rtol=0, atol=1e-12)
    items = _items()
    f_mu, f_var = la(items)  # single items: the reward, regression outputs without noise
    torch.testing.assert_close(f_mu, model(items).detach())
    jac = _last_layer_jacobian(model, items)  # (4, 1, 7)
    sigma = torch.linalg.inv(la.posterior_precision)
    torch.testing.assert_close(f_var, torch.einsum("bcp,pq,bdq->bcd", jac, sigma, jac), rtol=1e-10, atol=1e-12)
    f_mu_joint, f_cov = la(items, joint=True)
    flat = jac.reshape(4, 7)
    torch.testing.assert_close(f_cov, flat @ sigma @ flat.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f_mu_joint, f_mu.reshape(-1))


@pytest.mark.filterwarnings("ignore:hessian_structure:UserWarning")  # FlatPairs' ekfac: diagonal blocks
@pytest.mark.parametrize("model_class", [FlatPairs, PairAxis])
@pytest.mark.parametrize("structure", ["full", "diag", "kron", "ekfac"])
def test_last_layer_equals_the_all_weights_fit_last_block(model_class, structure):
    """Every structure whose blocks are per layer (lowrank's top-k eigenpairs are of the whole matrix: none)."""
    la_last = Laplace(model_class(), "reward_modeling", "last_layer", structure).fit(_loader())
    la_all = Laplace(model_class(), "reward_modeling", "all", structure).fit(_loader())
    last, full = _dense_precision(la_last), _dense_precision(la_all)
    if structure != "full":  # block-diagonal: nothing couples the last layer to the others
        assert torch.count_nonzero(full[-7:, :-7]) == 0
    torch.testing.assert_close(last, full[-7:, -7:], rtol=1e-10, atol=1e-12)


def _last_layer_kfac(model: nn.Module, x: torch.Tensor, divisor: int) -> torch.Tensor:
    """The last layer's KFAC blocks (7, 7) on pairs x: G ⊗ A for the weight, G for the bias.

    G = sum over pairs and items of Lambda_n[i, i] (Lambda_n = diag p_n - p_n p_n^T), A = sum over the 2N item
    rows of a a^T / ``divisor``.
    """
    with torch.no_grad():
        a = torch.tanh(model.net[0](x)).reshape(-1, 6)  # (2N, 6)
        p = torch.softmax(model(x), -1)
    g = (p * (1 - p)).sum()  # sum of the diagonal entries of diag(p) - p p^T
    return torch.block_diag(g * (a.T @ a) / divisor, g.reshape(1, 1))


def test_pair_axis_kron_is_kfac_expand_over_the_two_items():
    """Layers run on (B, 2, d): G = sum_n sum_i Lambda_n[i, i], A = sum of a a^T over the 2N rows / (2N) (laplace-torch's too)."""
    model = PairAxis()
    x, _ = reward_pairs()
    la = Laplace(model, "reward_modeling", "last_layer", "kron", prior_precision=1e-3).fit(_loader())
    expected = _last_layer_kfac(model, x, divisor=2 * x.shape[0]) + 1e-3 * torch.eye(7, dtype=DTYPE)
    torch.testing.assert_close(_dense_precision(la), expected, rtol=1e-10, atol=1e-12)


def test_flat_pairs_kron_reads_the_item_rows_as_laplace_torch_does():
    """Layers run on (2B, d): G = sum over pairs and items of Lambda_n[i, i], A = sum of a a^T over the 2N rows / N.

    laplace-torch 0.3's factors for this model (curvlinops sees 2N rows and divides by the N pairs of the data
    set; benchmarks/laplace_torch_flows.py compares them: equal to 1e-15). Prediction stays on single items.
    """
    model = FlatPairs()
    x, _ = reward_pairs()
    la = Laplace(model, "reward_modeling", "last_layer", "kron", prior_precision=1e-3).fit(_loader())
    expected = _last_layer_kfac(model, x, divisor=x.shape[0]) + 1e-3 * torch.eye(7, dtype=DTYPE)
    torch.testing.assert_close(_dense_precision(la), expected, rtol=1e-10, atol=1e-12)
    f_mu, _ = la(_items())
    torch.testing.assert_close(f_mu, model(_items()).detach())
    with pytest.raises(ValueError, match="predict on single items"):
        la(x[:3], fitting=True)


def test_posthoc_kron_gives_item_row_layers_their_exact_diagonal_block():
    """posthoc's own Laplace (no item_rows): the layer run on (2B, d) gets its exact diagonal GGN block, said once."""
    import posthoc

    model = FlatPairs()
    x, _ = reward_pairs()
    with pytest.warns(UserWarning, match=r"the layers 'net\.2' have outputs that are not one row per example"):
        la = posthoc.Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron",
                             prior_precision=0.5, progress=False).fit(_loader())
    precision = la.structure.dense_precision(la.prior_precision, torch.tensor(1.0, dtype=DTYPE))
    torch.testing.assert_close(precision, torch.diag(torch.diagonal(_bradley_terry_ggn(model, x)) + 0.5),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model_class", [FlatPairs, PairAxis])
def test_fitting_outputs_nn_predictions_and_marglik_match_the_classification_fit(model_class):
    model = model_class()
    x, _ = reward_pairs()
    la = Laplace(model, "reward_modeling", "last_layer", "full", prior_precision=0.5).fit(_loader())
    cls = Laplace(model, "classification", "last_layer", "full", prior_precision=0.5).fit(_loader())
    torch.testing.assert_close(la(x[:3], fitting=True), cls(x[:3]))  # the pair's class probabilities
    torch.testing.assert_close(la.log_marginal_likelihood(), cls.log_marginal_likelihood())
    torch.testing.assert_close(la.optimize_prior_precision(), cls.optimize_prior_precision())
    items = _items()
    mean, var = la(items, pred_type="nn", link_approx="mc", n_samples=50, generator=torch.Generator().manual_seed(0))
    thetas = la.sample(50, generator=torch.Generator().manual_seed(0))  # the same draws
    with torch.no_grad():
        rewards = torch.stack([functional_call(model, {f"{LAST}.weight": t[:6].reshape(1, 6), f"{LAST}.bias": t[6:]},
                                               (items,)) for t in thetas])
    torch.testing.assert_close(mean, rewards.mean(0))
    torch.testing.assert_close(var, rewards.var(0))
    samples = la.predictive_samples(items, n_samples=7, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (7, 4, 1)  # rewards, not softmax
    probs = la(x[:3], pred_type="nn", link_approx="mc", fitting=True, n_samples=20)
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(-1), torch.ones(3, dtype=DTYPE))


@pytest.mark.parametrize("model_class", [FlatPairs, PairAxis])
def test_a_state_dict_round_trip_predicts_items_the_same(model_class):
    model = model_class()
    la = Laplace(model, "reward_modeling", "last_layer", "full").fit(_loader())
    fresh = Laplace(model, "reward_modeling", "last_layer", "full")
    fresh.load_state_dict(la.state_dict())
    for mine, theirs in zip(fresh(_items()), la(_items()), strict=True):
        torch.testing.assert_close(mine, theirs)


def test_bad_inputs_raise():
    model = FlatPairs()
    la = Laplace(model, "reward_modeling", "last_layer", "full")
    with pytest.raises(RuntimeError, match="fit"):
        la(_items())
    la.fit(_loader())
    with pytest.raises(ValueError, match="NaN"):
        la(torch.full((2, 3), float("nan"), dtype=DTYPE))
    with pytest.raises((ValueError, RuntimeError), match=r"\(4, 5\)"):
        la(torch.randn(4, 5, dtype=DTYPE))  # items with 5 features for a network of 3
    with pytest.raises(ValueError, match="pred_type"):
        la(_items(), pred_type="gp")
    with pytest.raises(ValueError, match="link_approx='mc'"):
        la(_items(), pred_type="nn")


@pytest.mark.parametrize("model_class", [FlatPairs, PairAxis])
def test_enable_backprop_gives_the_items_gradient_of_the_reward_mean_and_variance(model_class):
    la = Laplace(model_class(), "reward_modeling", "last_layer", "full", enable_backprop=True).fit(_loader())
    x = _items().requires_grad_(True)
    f_mu, f_var = la(x)
    (f_mu.sum() + f_var.sum()).backward()
    assert x.grad is not None
    la.enable_backprop = False
    step = torch.zeros_like(x)
    step[0, 0] = 1e-6

    def total(inputs: torch.Tensor) -> torch.Tensor:
        mean, var = la(inputs)
        return mean.sum() + var.sum()

    finite_difference = (total(x.detach() + step) - total(x.detach() - step)) / 2e-6
    torch.testing.assert_close(x.grad[0, 0], finite_difference, rtol=1e-6, atol=1e-9)


class _FlatTokens(nn.Module):
    """A classifier whose first layer runs on the (3B, 4) token rows of B examples, then per example again."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 5), nn.Linear(15, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x.reshape(-1, 4))).reshape(x.shape[0], 15))


def test_compat_kron_reads_item_rows_only_for_reward_modelling():
    """Elsewhere a layer that always sees m·B rows keeps its exact diagonal block, so the glm predictive runs."""
    model = _FlatTokens().to(DTYPE).eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 3, 4, generator=g, dtype=DTYPE), torch.randint(0, 3, (10,), generator=g)
    with pytest.warns(UserWarning, match=r"the layers 'a' have outputs that are not one row per example"):
        la = Laplace(model, "classification", "all", "kron").fit(DataLoader(TensorDataset(x, y), batch_size=4))
    assert [layer.name for layer in la.structure.layers] == ["b"]
    with torch.no_grad():
        torch.testing.assert_close(la.predict(x[:4], pred_type="glm").mean, model(x[:4]))
