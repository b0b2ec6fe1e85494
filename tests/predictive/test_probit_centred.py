"""The centred probit link: probit after projecting out the all-logits shift, which softmax ignores (float64)."""

import torch

from posthoc.predictive import GaussianPredictive
from posthoc.predictive.links import centred_variances, make_generator, mc_probs, probit, probit_centred

N_CLASSES = 4


def _projector(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)


def _mean_and_cov(seed: int, batch: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean = 3 * torch.randn(batch, N_CLASSES, generator=g, dtype=torch.float64)
    a = torch.randn(batch, N_CLASSES, N_CLASSES, generator=g, dtype=torch.float64)
    return mean, a @ a.transpose(-1, -2) + 0.1 * torch.eye(N_CLASSES, dtype=torch.float64)


def test_centred_variances_are_the_diagonal_of_the_projected_covariance():
    _, cov = _mean_and_cov(0)
    p = _projector(N_CLASSES)
    dense = torch.diagonal(p @ cov @ p, dim1=-2, dim2=-1)
    torch.testing.assert_close(centred_variances(cov), dense)
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    torch.testing.assert_close(centred_variances(var), torch.diagonal(p @ torch.diag_embed(var) @ p, dim1=-2, dim2=-1))


def test_equals_probit_without_a_shift_component():
    mean, cov = _mean_and_cov(1)
    p = _projector(N_CLASSES)
    mean, cov = mean @ p, p @ cov @ p  # zero-sum mean, Sigma 1 = 0
    torch.testing.assert_close(probit_centred(mean, cov), probit(mean, cov))


def test_invariant_to_a_shared_shift_where_probit_is_not():
    mean, cov = _mean_and_cov(2)
    ones = torch.ones(N_CLASSES, N_CLASSES, dtype=torch.float64)
    shifted_mean, shifted_cov = mean + 7.0, cov + 25.0 * ones
    torch.testing.assert_close(probit_centred(shifted_mean, shifted_cov), probit_centred(mean, cov))
    assert not torch.allclose(probit(shifted_mean, shifted_cov), probit(mean, cov), atol=1e-3)


def test_softmax_mc_is_unchanged_by_a_shared_shift_variance():
    # E softmax(f) for f ~ N(mu, Sigma + c 11^T) equals that of N(mu, Sigma): the shift is a random common offset
    mean, cov = _mean_and_cov(3, batch=3)
    ones = torch.ones(N_CLASSES, N_CLASSES, dtype=torch.float64)
    n_samples = 200_000
    plain = mc_probs(mean, cov, n_samples, make_generator(0))
    shifted = mc_probs(mean, cov + 50.0 * ones, n_samples, make_generator(1))
    # two independent estimates of probabilities in [0, 1]: standard error below 0.5 / sqrt(S) each
    torch.testing.assert_close(shifted, plain, atol=6 * 0.5 * (2 / n_samples) ** 0.5, rtol=0)


def test_centred_probit_is_a_link_of_the_gaussian_predictive():
    mean, cov = _mean_and_cov(4)
    torch.testing.assert_close(GaussianPredictive(mean, cov=cov).probs("probit_centred"), probit_centred(mean, cov))
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    torch.testing.assert_close(GaussianPredictive(mean, var=var).probs("probit_centred"), probit_centred(mean, var))


def test_laplace_call_accepts_the_centred_probit():
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from posthoc import Laplace

    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (30,), generator=g)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, N_CLASSES)).to(torch.float64).eval()
    la = Laplace(model, "classification", "last_layer", "full", progress=False).fit(
        DataLoader(TensorDataset(x, y), batch_size=10))
    pred = la.predict(x[:4])
    torch.testing.assert_close(la(x[:4], link_approx="probit_centred"), probit_centred(pred.mean, pred.cov))
    torch.testing.assert_close(la(x[:4]), probit_centred(pred.mean, pred.cov))  # posthoc's default
    torch.testing.assert_close(la.predictive(x[:4]), probit_centred(pred.mean, pred.cov))
    torch.testing.assert_close(la(x[:4], link_approx="probit"), probit(pred.mean, pred.cov))  # laplace-torch's


def test_laplace_torch_compat_keeps_the_probit_default_and_the_tuning_follows_the_default_link(monkeypatch):
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from posthoc import Laplace
    from posthoc.compat.laplace import Laplace as CompatLaplace
    from posthoc.laplace import laplace as laplace_module

    g = torch.Generator().manual_seed(6)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (30,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, N_CLASSES)).to(torch.float64).eval()
    compat = CompatLaplace(model, "classification", "last_layer", "full")
    compat.fit(loader)
    pred = compat.predict(x[:4])
    torch.testing.assert_close(compat(x[:4]), probit(pred.mean, pred.cov))
    seen = []
    original = laplace_module.validation_nll_sum

    def recording(pred, y, likelihood, sigma_noise, link_approx, seed):
        seen.append(link_approx)
        return original(pred, y, likelihood, sigma_noise, link_approx, seed)

    monkeypatch.setattr(laplace_module, "validation_nll_sum", recording)
    la = Laplace(model, "classification", "last_layer", "full", progress=False).fit(loader)
    la.optimize_prior_precision(val_loader=loader, grid=torch.tensor([1.0]))
    la.optimize_prior_precision(val_loader=loader, grid=torch.tensor([1.0]), link_approx="probit")
    assert seen == ["probit_centred"] * 3 + ["probit"] * 3  # three validation batches each
