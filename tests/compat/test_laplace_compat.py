"""posthoc.compat.laplace: laplace-torch-style code with only the import changed, against posthoc's own API."""

import warnings
from collections.abc import Mapping

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import posthoc
from posthoc.compat.laplace import (
    DiagSubnetLaplace,
    FullLaplace,
    KronLLLaplace,
    Laplace,
    LinkApprox,
    LowRankLaplace,
    PredType,
    marglik_training,
)
from posthoc.compat.laplace.baselaplace import curvature_from_backend
from posthoc.compat.laplace.curvature import AsdlHessian, BackPackEF, CurvlinopsEF, CurvlinopsGGN, CurvlinopsHessian
from posthoc.compat.laplace.utils import LargestMagnitudeSubnetMask, ModuleNameSubnetMask

DTYPE = torch.float64


def _fitted_structure(la):
    """The fitted posterior structure (``la.structure``; ``la.curvature`` before that rename)."""
    attrs = vars(la)
    return attrs["structure"] if "structure" in attrs else attrs["curvature"]


def _regression():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, generator=g, dtype=DTYPE) * 6 - 3
    y = torch.sin(x) + 0.2 * torch.randn(40, 1, generator=g, dtype=DTYPE)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 1)).to(DTYPE)
    return model, DataLoader(TensorDataset(x, y), batch_size=10), x


def _classification():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(45, 2, generator=g, dtype=DTYPE)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE)
    return model, DataLoader(TensorDataset(x, y), batch_size=15), x


class _TakesMapping(nn.Module):
    """laplace-torch's wrapper for dict batches: forward(data) reads data["input_ids"] (a tensor also works)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, data):
        return self.net(data["input_ids"] if isinstance(data, Mapping) else data)


def test_regression_flow_of_the_laplace_torch_readme():
    model, train_loader, x = _regression()
    # --- laplace-torch's regression example, with only the import changed
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="full")
    la.fit(train_loader)
    log_prior, log_sigma = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
    hyper_optimizer = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
    for _ in range(30):
        hyper_optimizer.zero_grad()
        neg_marglik = -la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
        neg_marglik.backward()
        hyper_optimizer.step()
    f_mu, f_var = la(x)
    f_sigma = f_var.squeeze().sqrt()
    pred_std = torch.sqrt(f_sigma**2 + la.sigma_noise.item() ** 2)
    # ---
    # the loop left la at the last hyperparameters tried, as in laplace-torch
    torch.testing.assert_close(la.prior_precision, log_prior.detach().exp().to(DTYPE), rtol=0.05, atol=0)
    assert float(la.sigma_noise) != 1.0
    own = posthoc.Laplace(model, "regression", subset_of_weights="all", hessian_structure="full",
                          prior_precision=la.prior_precision, sigma_noise=la.sigma_noise, progress=False)
    pred = own.fit(train_loader).predict(x)
    assert f_mu.shape == (40, 1) and f_var.shape == (40, 1, 1)
    torch.testing.assert_close(f_mu, pred.mean)
    torch.testing.assert_close(f_var, pred.cov)  # no observation noise in la(x)
    torch.testing.assert_close(pred_std, pred.with_noise(la.sigma_noise).var.squeeze().sqrt())


def test_classification_flow_with_tuning_and_links():
    model, train_loader, x = _classification()
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
    probs = la(x, pred_type="glm", link_approx="probit")
    own = posthoc.Laplace(model, "classification", "last_layer", "kron", progress=False).fit(train_loader)
    own.optimize_prior_precision(method="marglik", init_prior_prec=1.0)
    torch.testing.assert_close(la.prior_precision, own.prior_precision)
    torch.testing.assert_close(probs, own.predict(x).probs("probit"))
    assert torch.allclose(probs.sum(-1), torch.ones(45, dtype=DTYPE))
    for link in (LinkApprox.BRIDGE, LinkApprox.BRIDGE_NORM, "mc"):
        assert la(x, pred_type=PredType.GLM, link_approx=link).shape == (45, 3)
    # gridsearch with laplace-torch's grid_size: the grid is logspace(-4, 4, grid_size)
    val = DataLoader(TensorDataset(x[:15], train_loader.dataset.tensors[1][:15]), batch_size=15)
    la.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=5)
    own.optimize_prior_precision(method="gridsearch", val_loader=val, grid=torch.logspace(-4, 4, 5, dtype=DTYPE),
                                 link_approx="probit")  # laplace-torch's (and compat's) link
    torch.testing.assert_close(la.prior_precision, own.prior_precision)
    # log_prior_prec_base: the grid is base ** linspace(min, max, grid_size)
    la.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=7, log_prior_prec_min=-3,
                                log_prior_prec_max=3, log_prior_prec_base=2.0)
    own.optimize_prior_precision(method="gridsearch", val_loader=val, link_approx="probit",
                                 grid=2.0 ** torch.linspace(-3, 3, 7, dtype=DTYPE))
    torch.testing.assert_close(la.prior_precision, own.prior_precision)
    with pytest.raises(ValueError, match="log_prior_prec_base"):
        la.optimize_prior_precision(method="gridsearch", val_loader=val, log_prior_prec_base=1.0)
    # laplace-torch's default dict keys
    dict_loader = [{"input_ids": xb, "labels": yb} for xb, yb in train_loader]
    dict_la = Laplace(_TakesMapping(model), "classification", subset_of_weights="all", hessian_structure="diag")
    dict_la.fit(dict_loader)
    assert dict_la.n_data == 45


def test_class_names_and_subnetwork_masks():
    model, train_loader, x = _classification()
    full = FullLaplace(model, "classification", prior_precision=0.5).fit(train_loader)
    own = posthoc.Laplace(model, "classification", "all", "full", prior_precision=0.5, progress=False).fit(train_loader)
    torch.testing.assert_close(full.posterior_precision, _fitted_structure(own).dense_precision(own.prior_precision,
                                                                                       torch.ones((), dtype=DTYPE)))
    assert isinstance(full, Laplace) and full.subset.kind.value == "all"
    assert KronLLLaplace(model, "classification").subset.kind.value == "last_layer"
    indices = LargestMagnitudeSubnetMask(model, n_params_subnet=6).select()
    sub = DiagSubnetLaplace(model, "classification", indices).fit(train_loader)
    assert sub.n_params == 6 and sub.posterior_precision.shape == (6,)
    torch.testing.assert_close(sub.posterior_variance, 1 / sub.posterior_precision)  # a property, as laplace-torch
    head = ModuleNameSubnetMask(model, ["2"]).select()
    la = Laplace(model, "classification", subset_of_weights="subnetwork", hessian_structure="full",
                 subnetwork_indices=head).fit(train_loader)
    last = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="full").fit(train_loader)
    torch.testing.assert_close(la(x), last(x))  # the head as a subnetwork is the last-layer Laplace


def test_backends_choose_the_curvature():
    model, train_loader, _ = _classification()
    assert Laplace(model, "classification", backend=CurvlinopsGGN).factors.curvature.value == "ggn"
    assert Laplace(model, "classification", backend=BackPackEF).factors.curvature.value == "ef"
    stochastic = Laplace(model, "classification", backend=CurvlinopsGGN, backend_kwargs={"stochastic": True})
    assert stochastic.factors.curvature.value == "ggn_mc"
    assert curvature_from_backend(None, None, None) == ("ggn", [])
    with pytest.raises(ValueError, match="not the Hessian"):
        Laplace(model, "classification", backend=AsdlHessian)
    with pytest.raises(ValueError, match="not the Hessian"):
        Laplace(model, "classification", backend=CurvlinopsHessian)
    with pytest.raises(ValueError, match="contradicts curvature='ggn'"):
        Laplace(model, "classification", backend=CurvlinopsEF, curvature="ggn")
    with pytest.raises(ValueError, match="GGN backends only"):
        Laplace(model, "classification", backend=CurvlinopsEF, backend_kwargs={"stochastic": True})
    with pytest.warns(UserWarning, match="cannot change posthoc's numbers") as record:
        Laplace(model, "classification", backend=CurvlinopsGGN, backend_kwargs={"subsampling": 2},
                asdl_fisher_kwargs={"n_mc_samples": 3})
    assert len(record) == 1 and "asdl_fisher_kwargs" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Laplace(model, "classification", backend=CurvlinopsGGN)  # nothing ignored, no warning

    class GGN:  # a class named like a backend of laplace-torch itself
        pass

    GGN.__name__ = "SomeLibraryGGN"
    assert Laplace(model, "classification", backend=GGN).factors.curvature.value == "ggn"
    with pytest.raises(TypeError, match="marker"):
        CurvlinopsGGN()


def test_unknown_feature_reduction_raises():
    model, train_loader, _ = _classification()
    with pytest.raises(ValueError, match="feature_reduction"):
        Laplace(model, "classification", feature_reduction="max")


def test_compat_marglik_training_returns_a_compat_laplace():
    model, train_loader, x = _regression()
    la, trained, margliks, losses = marglik_training(model, train_loader, "regression", "diag", n_epochs=3,
                                                     n_hypersteps=2, backend=CurvlinopsGGN,
                                                     optimizer_kwargs={"lr": 0.01})
    assert isinstance(la, Laplace) and trained is model and len(margliks) == 6 and len(losses) == 3
    f_mu, f_var = la(x[:4])
    assert f_mu.shape == (4, 1) and f_var.shape == (4, 1, 1)
    with pytest.raises(ValueError, match="not the Hessian"):
        marglik_training(model, train_loader, "regression", backend=AsdlHessian)
    la, *_ = marglik_training(model, train_loader, "regression", "diag", n_epochs=1, enable_backprop=True)
    assert la(x[:2].clone().requires_grad_(True))[1].requires_grad


def test_prior_mean_enters_the_evidence_only():
    model, train_loader, x = _classification()
    plain = Laplace(model, "classification", subset_of_weights="all", hessian_structure="full", prior_precision=0.7)
    plain.fit(train_loader)
    mu0 = 0.1 * torch.arange(plain.n_params, dtype=DTYPE) / plain.n_params
    shifted = Laplace(model, "classification", subset_of_weights="all", hessian_structure="full",
                      prior_precision=0.7, prior_mean=mu0).fit(train_loader)
    theta = shifted.mean
    torch.testing.assert_close(shifted.scatter, 0.7 * ((theta - mu0) ** 2).sum())
    expected = plain.log_marginal_likelihood() - 0.5 * (shifted.scatter - plain.scatter)
    torch.testing.assert_close(shifted.log_marginal_likelihood(), expected)
    torch.testing.assert_close(shifted.log_likelihood, plain.log_likelihood)
    torch.testing.assert_close(shifted(x), plain(x))  # the posterior stays centred at theta*
    # differentiable in delta, so marglik tuning sees the prior mean: d/d delta of -delta/2 |theta - mu0|^2 differs
    shifted.optimize_prior_precision(method="marglik", n_steps=50)
    plain.optimize_prior_precision(method="marglik", n_steps=50)
    assert not torch.allclose(shifted.prior_precision, plain.prior_precision)
    scalar = Laplace(model, "classification", prior_mean=0.5)
    assert scalar.prior_mean.shape == ()
    with pytest.raises(ValueError, match="prior_mean must be a scalar or have one entry"):
        Laplace(model, "classification", subset_of_weights="all", prior_mean=torch.zeros(4))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_temperature_tempers_curvature_and_likelihood(likelihood):
    model, train_loader, x = _classification() if likelihood == "classification" else _regression()
    sigma = 1.0 if likelihood == "classification" else 0.6
    kwargs = {"subset_of_weights": "all", "hessian_structure": "full", "prior_precision": 0.7, "sigma_noise": sigma}
    plain = Laplace(model, likelihood, **kwargs).fit(train_loader)
    hot = Laplace(model, likelihood, temperature=0.4, **kwargs).fit(train_loader)
    delta = torch.diag(plain.prior_precision_diag)
    torch.testing.assert_close(hot.posterior_precision, (plain.posterior_precision - delta) / 0.4 + delta)
    loglik = plain.log_likelihood
    normaliser = 0.0 if likelihood == "classification" else 0.5 * 40 * torch.log(torch.tensor(2 * torch.pi * sigma**2))
    tempered = (loglik + normaliser) / 0.4 - normaliser
    expected = tempered - 0.5 * (torch.logdet(hot.posterior_precision) - plain.log_det_prior_precision + plain.scatter)
    torch.testing.assert_close(hot.log_marginal_likelihood(), expected)
    own = posthoc.Laplace(model, likelihood, progress=False, **kwargs).fit(train_loader)
    assert not torch.allclose(hot.predict(x).cov, own.predict(x).cov)
    with pytest.raises(ValueError, match="temperature must be"):
        Laplace(model, likelihood, temperature=0.0)


@pytest.mark.parametrize(("subset", "structure"), [("all", "full"), ("all", "diag"), ("last_layer", "full"),
                                                   ("last_layer", "kron")])
def test_enable_backprop_gives_gradients_in_x(subset, structure):
    model, train_loader, x = _regression()
    la = Laplace(model, "regression", subset_of_weights=subset, hessian_structure=structure, enable_backprop=True,
                 sigma_noise=0.3).fit(train_loader)
    frozen = Laplace(model, "regression", subset_of_weights=subset, hessian_structure=structure,
                     sigma_noise=0.3).fit(train_loader)

    def acquisition(points):  # an upper confidence bound, as in Bayesian optimisation
        f_mu, f_var = la(points)
        return (f_mu.squeeze(-1) + 2 * f_var.squeeze(-1).squeeze(-1).sqrt()).sum()

    points = x[:3].clone().requires_grad_(True)
    acquisition(points).backward()
    step = 1e-6
    for i in range(3):
        shift = torch.zeros_like(points)
        shift[i, 0] = step
        numeric = (acquisition(points.detach() + shift) - acquisition(points.detach() - shift)) / (2 * step)
        torch.testing.assert_close(points.grad[i, 0], numeric.detach(), rtol=1e-5, atol=1e-8)
    f_mu, f_var = la(x[:4])
    ref_mu, ref_var = frozen(x[:4])
    torch.testing.assert_close(f_mu, ref_mu)
    torch.testing.assert_close(f_var, ref_var)
    probs_model, train_c, xc = _classification()
    cls = Laplace(probs_model, "classification", subset_of_weights=subset, hessian_structure=structure,
                  enable_backprop=True).fit(train_c)
    point = xc[:2].clone().requires_grad_(True)
    cls(point, link_approx="bridge_norm")[:, 0].sum().backward()
    assert point.grad is not None and bool(torch.isfinite(point.grad).all())
    assert frozen(x[:4])[1].grad_fn is None  # without enable_backprop the outputs are detached


def test_lowrank_keeps_the_prior_outside_the_top_k_as_laplace_torch():
    model, train_loader, x = _classification()
    compat = LowRankLaplace(model, "classification", prior_precision=0.5, structure_options={"rank": 3}).fit(train_loader)
    assert _fitted_structure(compat).complement.value == "prior"
    kept = posthoc.Laplace(model, "classification", "all", "lowrank", prior_precision=0.5, progress=False,
                           structure_options={"rank": 3, "complement": "prior"}).fit(train_loader)
    omitted = posthoc.Laplace(model, "classification", "all", "lowrank", prior_precision=0.5, progress=False,
                              structure_options={"rank": 3}).fit(train_loader)
    torch.testing.assert_close(compat.predict(x[:5]).cov, kept.predict(x[:5]).cov)
    assert not torch.allclose(compat.predict(x[:5]).cov, omitted.predict(x[:5]).cov)
    chosen = LowRankLaplace(model, "classification", structure_options={"rank": 3, "complement": "omit"})
    assert chosen.structure_options["complement"] == "omit"


def test_n_layers_sizes_a_layerwise_prior_and_2d_priors_are_refused():
    model, loader, x = _classification()
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit(loader)
    assert la.n_layers == 4  # two weights and two biases, laplace-torch's len(self.params)
    la.prior_precision = torch.ones(la.n_layers, dtype=DTYPE)
    last = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    last.fit(loader)
    assert last.n_layers == 2
    for bad in (torch.ones(2, 2, dtype=DTYPE), torch.ones(1, 1, dtype=DTYPE)):  # laplace-torch refuses them too
        with pytest.raises(ValueError, match="scalar or a 1-D tensor"):
            la.prior_precision = bad
        with pytest.raises(ValueError, match="scalar or a 1-D tensor"):
            la.log_marginal_likelihood(bad)


def test_classification_with_one_output_names_the_binary_likelihood():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 2, generator=g, dtype=DTYPE)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(DTYPE)
    for y in (torch.zeros(20, dtype=torch.long), (x[:, 0] > 0).long()):  # all-zero labels used to fit silently
        with pytest.raises(ValueError, match="likelihood='binary'"):
            posthoc.Laplace(model, "classification", "all", "diag", progress=False).fit(
                DataLoader(TensorDataset(x, y), batch_size=10))
