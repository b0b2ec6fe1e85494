"""Issue 17's bench rows: the MC-link rows share the probit rows' fits, the MC gridsearch tunes with the MC link,
and la_lowrank leaves the uncovered directions out (la_lowrank_prior keeps laplace-torch's posterior)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from posthoc.bench import BenchContext, get_methods
from posthoc.bench.methods import GRIDSEARCH_PRIORS, laplace_builder
from posthoc.data.toy import blobs
from posthoc.laplace import Laplace
from posthoc.predictive import LinkApprox


def _context() -> BenchContext:
    torch.manual_seed(0)
    x, y = blobs(n=60, n_classes=3, std=0.8, seed=1)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    x_val, y_val = blobs(n=30, n_classes=3, std=0.8, seed=2)
    return BenchContext(model=model.eval(), suite=None, train_loader=DataLoader(TensorDataset(x, y), batch_size=16),
                        val_loader=DataLoader(TensorDataset(x_val, y_val), batch_size=16), context_loader=None,
                        seed=0, progress=False)


def test_mc_rows_predict_by_mc_and_share_the_probit_rows_fits():
    specs = {s.name: s for s in get_methods(["la_lastlayer_full", "la_lastlayer_full_mc", "la_kron", "la_kron_mc",
                                             "la_kron_gridsearch", "la_kron_gridsearch_mc"])}
    for name in ("la_lastlayer_full_mc", "la_kron_mc", "la_kron_gridsearch_mc"):
        assert specs[name].link_approx is LinkApprox.MC and specs[name].shards_fit
        assert specs[name.removesuffix("_mc")].link_approx is LinkApprox.PROBIT
    ctx = _context()
    assert specs["la_kron_mc"].build(ctx) is specs["la_kron"].build(ctx)  # one fit, two links
    assert specs["la_lastlayer_full_mc"].build(ctx) is specs["la_lastlayer_full"].build(ctx)
    assert specs["la_kron_gridsearch_mc"].build(ctx) is not specs["la_kron_gridsearch"].build(ctx)


def test_mc_gridsearch_tunes_with_the_mc_link(monkeypatch):
    ctx = _context()
    seen = []
    tune = Laplace.optimize_prior_precision

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("link_approx"))
        return tune(self, *args, **kwargs)

    monkeypatch.setattr(Laplace, "optimize_prior_precision", recording)
    built = laplace_builder("full", "all", tuning="gridsearch", tuning_link="mc")(ctx)
    assert seen == [LinkApprox.MC]
    la = Laplace(ctx.model, "classification", "all", "full", progress=False).fit(ctx.train_loader)
    la.optimize_prior_precision(method="gridsearch", val_loader=ctx.val_loader, grid=torch.tensor(GRIDSEARCH_PRIORS),
                                link_approx="mc")
    torch.testing.assert_close(built.prior_precision, la.prior_precision)
    laplace_builder("full", "all", tuning="gridsearch")(ctx)  # the probit row keeps the probit link
    assert seen[-1] is LinkApprox.PROBIT


def test_lowrank_rows_complement():
    ctx = _context()
    omit, prior = (spec.build(ctx) for spec in get_methods(["la_lowrank", "la_lowrank_prior"]))
    assert omit.structure.complement.value == "omit" and prior.structure.complement.value == "prior"
    x = torch.randn(5, 2)
    # the same eigenpairs; the omitted posterior's evidence holds the complement at theta* (not undetermined, as
    # the full model's does): a larger marglik prior precision
    assert torch.equal(omit.structure.eigenvalues, prior.structure.eigenvalues)
    assert float(omit.prior_precision) > float(prior.prior_precision)
    # at one prior, leaving the complement out only removes logit variance
    delta, scale = omit.prior_precision, omit.factors.scale(omit.sigma_noise)
    inputs = omit.subset.inputs(x)
    gap = (prior.structure.functional_covariance(inputs, delta, scale)
           - omit.structure.functional_covariance(inputs, delta, scale))
    assert float(torch.linalg.eigvalsh(gap).min()) > -1e-5 and float(torch.diagonal(gap, dim1=1, dim2=2).min()) > 0


def test_lastlayer_gridsearch_row_takes_its_prior_from_the_grid():
    (spec,) = get_methods(["la_lastlayer_full_gridsearch"])
    assert spec.link_approx is LinkApprox.PROBIT
    la = spec.build(_context())
    assert la.subset.kind.value == "last_layer" and float(la.prior_precision) in GRIDSEARCH_PRIORS


def test_centred_rows_predict_by_the_centred_probit_and_share_the_fits():
    specs = {s.name: s for s in get_methods(["la_lastlayer_full", "la_lastlayer_full_centred", "la_kron",
                                             "la_kron_centred", "la_kron_gridsearch_centred"])}
    for name in ("la_lastlayer_full_centred", "la_kron_centred", "la_kron_gridsearch_centred"):
        assert specs[name].link_approx is LinkApprox.PROBIT_CENTRED and specs[name].shards_fit
    ctx = _context()
    assert specs["la_kron_centred"].build(ctx) is specs["la_kron"].build(ctx)
    assert specs["la_lastlayer_full_centred"].build(ctx) is specs["la_lastlayer_full"].build(ctx)
    tuned = specs["la_kron_gridsearch_centred"].build(ctx)
    la = Laplace(ctx.model, "classification", "all", "kron", progress=False).fit(ctx.train_loader)
    la.optimize_prior_precision(method="gridsearch", val_loader=ctx.val_loader, grid=torch.tensor(GRIDSEARCH_PRIORS),
                                link_approx="probit_centred")
    torch.testing.assert_close(tuned.prior_precision, la.prior_precision)


def test_la_default_is_laplaces_defaults_with_the_validation_loader():
    ctx = _context()
    specs = {s.name: s for s in get_methods(["la_default", "la_default_centred"])}
    assert specs["la_default"].link_approx is LinkApprox.PROBIT
    assert specs["la_default_centred"].link_approx is LinkApprox.PROBIT_CENTRED
    built = specs["la_default"].build(ctx)
    la = Laplace(ctx.model, "classification", progress=False).fit(ctx.train_loader)
    la.optimize_prior_precision(method="gridsearch", val_loader=ctx.val_loader, grid=torch.logspace(-4, 4, 21),
                                link_approx="probit")
    assert (built.subset.kind, built.structure_name) == (la.subset.kind, la.structure_name)
    torch.testing.assert_close(built.prior_precision, la.prior_precision)
    centred = specs["la_default_centred"].build(ctx)
    la.optimize_prior_precision(val_loader=ctx.val_loader)  # the default link: the centred probit
    torch.testing.assert_close(centred.prior_precision, la.prior_precision)


def test_unknown_tuning_is_refused():
    with pytest.raises(ValueError, match="tuning must be"):
        laplace_builder("kron", "all", tuning="evidence")
