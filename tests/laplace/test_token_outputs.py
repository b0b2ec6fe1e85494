"""Laplace on outputs with positions (B, ..., C): per token and per pixel, with ignored (-100) positions.

Every number is checked in float64 against a dense reference built here by torch.func.jacrev over all
positions of the flat parameters (no library Jacobian code): H = sum_n sum_t kept J_nt^T Gamma_nt J_nt and
the glm covariance per position J_nt Lambda^-1 J_nt^T.
"""

from __future__ import annotations

import math

import pytest
import torch
from references import model_jacobians
from torch import nn
from torch.func import functional_call, jacrev

from posthoc import Laplace

DTYPE = torch.float64
VOCAB, DIM, CLASSES, LENGTH = 7, 4, 3, 5


class TokenModel(nn.Module):
    """Embedding -> tanh -> Linear per token: outputs (B, T, C), positions independent."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x)))


class AttentionModel(nn.Module):
    """Embedding -> one self-attention layer (q, k, v Linear) with a residual -> Linear head: positions interact."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        scores = self.q(h) @ self.k(h).transpose(-1, -2) / math.sqrt(DIM)
        return self.head(torch.tanh(h + torch.softmax(scores, -1) @ self.v(h)))


class TiedLM(nn.Module):
    """GPT-2's tying: ``lm_head.weight is wte.weight``; outputs (B, T, V)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mix(self.wte(x))))


def token_data(seed: int = 0, n: int = 6, n_classes: int = CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (n, T) and per-token labels (n, T) with a few -100 (ignored) positions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    y = torch.randint(0, n_classes, (n, LENGTH), generator=g)
    y[0, :2] = -100
    y[3, -1] = -100
    return x, y


def make(model_cls: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return model_cls().to(DTYPE)


def loader(x: torch.Tensor, y: torch.Tensor, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


def reference_jacobians(model: nn.Module, x: torch.Tensor, last_layer: str | None = None) -> torch.Tensor:
    """J (B, T, C, P) of the outputs in the flat covered parameters, by jacrev over the whole batch."""
    if last_layer is None:
        return model_jacobians(model, x)
    layer = dict(model.named_modules())[last_layer]
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    w, b = layer.weight.detach(), layer.bias.detach()
    theta = torch.cat([w.reshape(-1), b])

    def f(th: torch.Tensor) -> torch.Tensor:
        return captured[0] @ th[:w.numel()].view_as(w).T + th[w.numel():]
    return jacrev(f)(theta)  # (B, T, C, P)


def reference_ggn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, last_layer: str | None = None) -> torch.Tensor:
    """Sum over examples and kept positions of J_nt^T (diag p - p p^T) J_nt: (P, P)."""
    jac = reference_jacobians(model, x, last_layer)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    gamma = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # (B, T, C, C)
    kept = (y != -100).to(DTYPE)[..., None, None]
    return torch.einsum("btcp,btcd,btdq->pq", jac, gamma * kept, jac)


@pytest.mark.parametrize("model_cls", [TokenModel, AttentionModel])
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_ggn_and_glm_covariance_match_dense_reference(model_cls, structure):
    model = make(model_cls)
    x, y = token_data()
    prior = 0.8
    la = Laplace(model, "classification", "all", structure, prior_precision=prior, progress=False)
    la.fit(loader(x, y))
    assert la.n_data == int((y != -100).sum())  # N counts the kept positions
    ggn = reference_ggn(model, x, y)
    if structure == "full":
        torch.testing.assert_close(la.structure.hessian, ggn, rtol=1e-9, atol=1e-11)
        posterior = torch.linalg.inv(ggn + prior * torch.eye(len(ggn), dtype=DTYPE))
    else:
        torch.testing.assert_close(la.structure.diagonal, torch.diagonal(ggn), rtol=1e-9, atol=1e-11)
        posterior = torch.diag(1 / (torch.diagonal(ggn) + prior))
    x_test = x[:3]
    jac = reference_jacobians(model, x_test)
    expected = torch.einsum("btcp,pq,btdq->btcd", jac, posterior, jac)  # (B, T, C, C) per position
    pred = la.predict(x_test)
    assert pred.mean.shape == (3, LENGTH, CLASSES) and pred.cov.shape == (3, LENGTH, CLASSES, CLASSES)
    torch.testing.assert_close(pred.mean, model(x_test).detach())
    torch.testing.assert_close(pred.cov, expected, rtol=1e-8, atol=1e-12)


def test_marglik_data_term_counts_kept_positions_only():
    model = make(AttentionModel)
    x, y = token_data(seed=1)
    la = Laplace(model, "classification", "all", "diag", progress=False).fit(loader(x, y))
    with torch.no_grad():
        logp = torch.log_softmax(model(x), -1)
    kept = y != -100
    expected = logp[kept].gather(-1, y[kept].unsqueeze(-1)).sum()
    torch.testing.assert_close(la._loglik_stat, expected)
    evidence = la.log_marginal_likelihood()
    delta = la.prior_precision
    theta = la.subset.theta_map
    logdet = torch.log(la.structure.diagonal + delta).sum()
    by_hand = expected - 0.5 * (delta * theta**2).sum() + 0.5 * len(theta) * torch.log(delta) - 0.5 * logdet
    torch.testing.assert_close(evidence, by_hand.reshape(()))
    la.optimize_prior_precision(method="marglik", n_steps=5)
    assert torch.isfinite(la.log_marginal_likelihood())


def test_last_layer_on_a_token_head_matches_dense_reference():
    model = make(AttentionModel)
    x, y = token_data(seed=2)
    la = Laplace(model, "classification", "last_layer", "full", prior_precision=0.5, progress=False)
    la.fit(loader(x, y))
    assert la.subset.last_layer_name == "head"
    ggn = reference_ggn(model, x, y, last_layer="head")
    torch.testing.assert_close(la.structure.hessian, ggn, rtol=1e-9, atol=1e-11)
    posterior = torch.linalg.inv(ggn + 0.5 * torch.eye(len(ggn), dtype=DTYPE))
    jac = reference_jacobians(model, x[:2], last_layer="head")
    torch.testing.assert_close(la.predict(x[:2]).cov, torch.einsum("btcp,pq,btdq->btcd", jac, posterior, jac))


def test_kron_treats_positions_like_examples_of_the_head():
    """Last-layer KFAC: G = sum over kept positions of Gamma_nt, A = mean over all N·T positions of a aᵀ."""
    model = make(TokenModel)
    x, y = token_data(seed=3)
    la = Laplace(model, "classification", "last_layer", "kron", prior_precision=1.0, progress=False)
    la.fit(loader(x, y))
    with torch.no_grad():
        a = torch.tanh(model.emb(x))  # the head's inputs (B, T, D)
        p = torch.softmax(model(x), -1)
    kept = (y != -100).to(DTYPE)[..., None, None]
    g = ((torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) * kept).sum((0, 1))
    a_factor = torch.einsum("bti,btj->ij", a, a) / (x.shape[0] * x.shape[1])
    expected = torch.block_diag(torch.kron(g, a_factor), g)
    one = torch.ones(1, dtype=DTYPE)
    precision = la.structure.dense_precision(one, torch.ones((), dtype=DTYPE))
    torch.testing.assert_close(precision - torch.eye(len(precision), dtype=DTYPE), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_predictives_have_positions(structure, subset):
    model = make(AttentionModel)
    x, y = token_data(seed=4)
    la = Laplace(model, "classification", subset, structure, progress=False).fit(loader(x, y))
    probs = la(x[:2])
    assert probs.shape == (2, LENGTH, CLASSES)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, LENGTH, dtype=DTYPE))
    samples = la.predict(x[:2], pred_type="nn", n_samples=4)
    assert samples.mean.shape == (2, LENGTH, CLASSES) and samples.sample(3).shape == (3, 2, LENGTH, CLASSES)
    nn_probs = la(x[:2], pred_type="nn", link_approx="mc", n_samples=4)
    assert nn_probs.shape == (2, LENGTH, CLASSES)
    assert la(x[:2], link_approx="mc", n_samples=8).shape == (2, LENGTH, CLASSES)
    variances = la.predict(x[:2]).var
    assert variances.shape == (2, LENGTH, CLASSES) and bool((variances > 0).all())


def test_state_dict_restores_positions():
    model = make(TokenModel)
    x, y = token_data(seed=5)
    la = Laplace(model, "classification", "all", "diag", progress=False).fit(loader(x, y))
    fresh = Laplace(model, "classification", "all", "diag", progress=False)
    fresh.load_state_dict(la.state_dict())
    torch.testing.assert_close(fresh.predict(x[:2]).cov, la.predict(x[:2]).cov)


class PixelModel(nn.Module):
    """Conv2d -> tanh -> 1x1 Conv2d: per-pixel logits (B, C, H, W), channels first."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.out = nn.Conv2d(2, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.conv(x)))


def pixel_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 1, 3, 4, generator=g, dtype=DTYPE)
    y = torch.randint(0, CLASSES, (4, 3, 4), generator=g)
    y[1, 0, :] = -100
    return x, y


def test_channels_first_pixel_outputs_are_refused_with_the_fix():
    x, y = pixel_data()
    la = Laplace(make(PixelModel), "classification", "all", "diag", progress=False)
    with pytest.raises(ValueError, match=r"channels first.*movedim\(1, -1\)"):
        la.fit(loader(x, y))


def test_channels_last_pixel_outputs_match_dense_reference():
    model = make(PixelModel)
    x, y = pixel_data()
    la = Laplace(model, "classification", "all", "diag", prior_precision=0.6, progress=False,
                 output_fn=lambda out: out.movedim(1, -1))
    la.fit(loader(x, y, batch=3))
    channels_last = nn.Sequential()  # the same function, channels last, for the reference
    channels_last.forward = lambda inp: model(inp).movedim(1, -1)  # type: ignore[method-assign]
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(th: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        chunks, start = {}, 0
        for n in names:
            chunks[n] = th[start:start + params[n].numel()].view_as(params[n])
            start += params[n].numel()
        return functional_call(model, chunks, (inp,)).movedim(1, -1)

    jac = jacrev(f)(theta, x)  # (B, H, W, C, P)
    p = torch.softmax(f(theta, x), -1).detach()
    gamma = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) * (y != -100).to(DTYPE)[..., None, None]
    ggn_diag = torch.einsum("bhwcp,bhwcd,bhwdp->p", jac, gamma, jac)
    torch.testing.assert_close(la.structure.diagonal, ggn_diag, rtol=1e-9, atol=1e-11)
    pred = la.predict(x[:2])
    jt = jac[:2]
    expected = torch.einsum("bhwcp,p,bhwdp->bhwcd", jt, 1 / (ggn_diag + 0.6), jt)
    assert pred.cov.shape == (2, 3, 4, CLASSES, CLASSES)
    torch.testing.assert_close(pred.cov, expected, rtol=1e-8, atol=1e-12)


def test_per_position_regression_matches_dense_reference():
    model = make(TokenModel)
    x, _ = token_data(seed=7)
    y = torch.randn(len(x), LENGTH, CLASSES, generator=torch.Generator().manual_seed(8), dtype=DTYPE)
    la = Laplace(model, "regression", "all", "full", sigma_noise=0.5, progress=False).fit(loader(x, y))
    assert la.n_data == len(x) * LENGTH
    jac = reference_jacobians(model, x)
    torch.testing.assert_close(la.structure.hessian, torch.einsum("btcp,btcq->pq", jac, jac), rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        residual = ((y - model(x)) ** 2).sum()
    torch.testing.assert_close(la._loglik_stat, residual)


def test_tied_head_under_last_layer_is_refused():
    model = make(TiedLM)
    x, y = token_data(seed=9, n_classes=VOCAB)
    with pytest.raises(ValueError, match="lm_head.*tied weights.*subset_of_weights='all'"):
        Laplace(model, "classification", "last_layer", "kron", progress=False).fit(loader(x, y))


def test_tied_head_under_all_weights_counts_both_uses():
    model = make(TiedLM)
    x, y = token_data(seed=9, n_classes=VOCAB)
    la = Laplace(model, "classification", "all", "diag", progress=False).fit(loader(x, y))
    torch.testing.assert_close(la.structure.diagonal, torch.diagonal(reference_ggn(model, x, y)), rtol=1e-9,
                               atol=1e-11)


def test_many_classes_default_to_the_mc_ggn_unless_chosen():
    torch.manual_seed(0)
    model = nn.Linear(2, 1001).to(DTYPE)
    x = torch.randn(4, 2, dtype=DTYPE)
    y = torch.randint(0, 1001, (4,))
    with pytest.warns(UserWarning, match="1001 classes.*ggn_mc"):
        la = Laplace(model, "classification", "all", "diag", progress=False).fit([(x, y)])
    assert la.factors.curvature.value == "ggn_mc"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = Laplace(model, "classification", "all", "diag", curvature="ggn", progress=False).fit([(x, y)])
    assert chosen.factors.curvature.value == "ggn"
    fresh = Laplace(model, "classification", "all", "diag", progress=False)
    with pytest.warns(UserWarning, match="ggn_mc"):  # the default chooses the same curvature again
        fresh.load_state_dict(la.state_dict())
    torch.testing.assert_close(fresh.posterior_variance(), la.posterior_variance())
    # the glm covariance of 1001 classes (a (b, C, C, O) temporary of 32 GB here before the two-operand einsum)
    assert fresh.predict(x).cov.shape == (4, 1001, 1001)
    with pytest.raises(ValueError, match="curvature_type"):
        chosen.load_state_dict(la.state_dict())


def test_targets_that_do_not_match_the_positions_are_refused():
    model = make(TokenModel)
    x, y = token_data()
    la = Laplace(model, "classification", "all", "diag", progress=False)
    with pytest.raises(ValueError, match="targets must be"):
        la.fit([(x, y[:, :4])])
    with pytest.raises(ValueError, match="labels must lie"):
        la.fit([(x, torch.full_like(y, CLASSES))])


def test_laplace_torch_api_keeps_positions():
    model = make(TokenModel)
    x, y = token_data(seed=10)
    la = Laplace(model, "classification", "all", "diag", progress=False).fit(loader(x, y))
    shape = (2, LENGTH, CLASSES)
    for kind in ("glm", "nn"):
        assert la.functional_samples(x[:2], pred_type=kind, n_samples=3).shape == (3, *shape)
    samples = la.predictive_samples(x[:2], n_samples=3)
    torch.testing.assert_close(samples.sum(-1), torch.ones(3, 2, LENGTH, dtype=DTYPE))
    assert la(x[:2], link_approx="bridge").shape == shape
    la.enable_backprop = True
    with pytest.raises(NotImplementedError, match="positions"):
        la(x[:2])
    targets = torch.randn(len(x), LENGTH, CLASSES, generator=torch.Generator().manual_seed(11), dtype=DTYPE)
    reg = Laplace(model, "regression", "all", "full", progress=False).fit(loader(x, targets))
    mean, cov = reg(x[:2])
    assert mean.shape == shape and cov.shape == (*shape, CLASSES)
    mean, var = reg(x[:2], diagonal_output=True)
    torch.testing.assert_close(var, torch.diagonal(cov, dim1=-2, dim2=-1))
    flat_mean, joint = reg(x[:2], joint=True)  # laplace-torch's joint: over every output of the batch
    assert flat_mean.shape == (2 * LENGTH * CLASSES,) and joint.shape == (2 * LENGTH * CLASSES,) * 2
    torch.testing.assert_close(torch.diagonal(joint).reshape(shape), var)
    noisy = reg.predict(x[:2]).with_noise(reg.sigma_noise)
    assert noisy.log_prob(targets[:2]).shape == (2, LENGTH)


def test_lowrank_and_subnetwork_on_positions_match_dense_reference():
    model = make(AttentionModel)
    x, y = token_data(seed=12)
    ggn = reference_ggn(model, x, y)
    la = Laplace(model, "classification", "all", "lowrank", progress=False,
                 structure_options={"rank": 4, "basis": "ggn"})
    la.fit(loader(x, y))
    tiny, one = torch.tensor([1e-12], dtype=DTYPE), torch.ones((), dtype=DTYPE)
    top = torch.linalg.eigvalsh(la.structure.dense_precision(tiny, one))[-4:]
    torch.testing.assert_close(top, torch.linalg.eigvalsh(ggn)[-4:], rtol=1e-6, atol=1e-8)
    indices = torch.arange(0, 40, 3)
    sub = Laplace(model, "classification", "subnetwork", "full", subnetwork_indices=indices, progress=False)
    sub.fit(loader(x, y))
    torch.testing.assert_close(sub.structure.hessian, ggn[indices][:, indices], rtol=1e-9, atol=1e-11)
