"""ScaLLA on per-token outputs (B, T, C) with -100 targets, against a dense float64 linearised Laplace.

The reference is the LLA over every kept position: H = sum_n sum_t J_nt^T Gamma_nt J_nt (torch.func.jacrev), the
predictive of position t the block J_t (H + delta I)^-1 J_t^T.
"""

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.func import jacrev

from posthoc.network.subset import ParameterSubset
from posthoc.scalla import ScaLLA
from posthoc.scalla.surrogate import FeatureMap

DTYPE = torch.float64
VOCAB, DIM, CLASSES, SEQ = 7, 4, 3, 5


class TokenNet(nn.Module):
    """Embedding, a causal running mean over the tokens (positions see each other), a per-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        running = h.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.head(torch.tanh(self.mix(running)) + h)


def make_model(seed: int = 0) -> TokenNet:
    torch.manual_seed(seed)
    return TokenNet().to(DTYPE).eval()


def token_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (n, SEQ), right-padded lengths 5, 4, 3, ...; labels (n, SEQ) with -100 on the padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    kept = torch.arange(SEQ) < (SEQ - torch.arange(n) % 3)[:, None]
    y = torch.where(kept, torch.randint(0, CLASSES, (n, SEQ), generator=g), -100)
    return x * kept, y


def loader(x: torch.Tensor, y: torch.Tensor, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


def jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J (B, T, C, P) of the outputs at the model's weights, dense."""
    subset = ParameterSubset(model, "all")
    return jacrev(lambda th: subset.forward(x, th))(subset.theta_map)


def reference_covariance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, points: torch.Tensor,
                         prior: float, likelihood: str = "classification", sigma: float = 1.0) -> torch.Tensor:
    """Per-position J_t (H + delta I)^-1 J_t^T (B, T, C, C), H over the kept positions of (x, y)."""
    jac = jacobians(model, x)
    if likelihood == "classification":
        with torch.no_grad():
            p = torch.softmax(model(x), -1)
        gamma = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) * (y != -100).to(DTYPE)[..., None, None]
    else:
        gamma = torch.eye(CLASSES, dtype=DTYPE).expand(*x.shape, CLASSES, CLASSES) / sigma**2
    ggn = torch.einsum("btcp,btcd,btdq->pq", jac, gamma, jac)
    sigma_post = torch.linalg.inv(ggn + prior * torch.eye(len(ggn), dtype=DTYPE))
    jac_points = jacobians(model, points)
    return torch.einsum("btcp,pq,btdq->btcd", jac_points, sigma_post, jac_points)


class ExactFeatures(nn.Module):
    """phi(x, t) = J_{x,t}^T (P, C) per position: the latent model is then the linearised network exactly."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return jacobians(self.model, x).transpose(-1, -2)  # (B, T, P, C)


def exact_scalla(model: nn.Module, likelihood: str, prior: float, sigma: float = 1.0) -> ScaLLA:
    n_params = ParameterSubset(model, "all").n_params
    s = ScaLLA(model, likelihood, n_features=n_params, prior_precision=prior, sigma_noise=sigma, progress=False)
    s.surrogate = FeatureMap(ExactFeatures(model), n_params, CLASSES, position_dims=1)
    s.n_outputs, s.input_shape, s.position_dims = CLASSES, (SEQ,), 1
    return s


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_exact_features_give_the_dense_per_position_lla(likelihood):
    model = make_model()
    x, y = token_data(12, seed=0)
    sigma = 0.7 if likelihood == "regression" else 1.0
    if likelihood == "regression":
        y = torch.randn(12, SEQ, CLASSES, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    s = exact_scalla(model, likelihood, prior=2.0, sigma=sigma).fit_posterior(loader(x, y))
    # N counts the kept positions (classification: 5 + 4 + 3 per three examples; regression keeps every one)
    assert s.posterior.n_data == (48 if likelihood == "classification" else 60)
    points, _ = token_data(4, seed=1)
    pred = s.predict(points)
    assert pred.mean.shape == (4, SEQ, CLASSES) and pred.cov.shape == (4, SEQ, CLASSES, CLASSES)
    torch.testing.assert_close(pred.mean, model(points).detach(), rtol=0, atol=0)
    ref = reference_covariance(model, x, y, points, 2.0, likelihood, sigma)
    torch.testing.assert_close(pred.cov, ref, rtol=1e-7, atol=1e-10)
    if likelihood == "classification":
        assert s(points).shape == (4, SEQ, CLASSES)
        torch.testing.assert_close(s(points).sum(-1), torch.ones(4, SEQ, dtype=DTYPE))


def test_ignored_positions_change_nothing():
    """An example whose positions are all -100 adds nothing: the posterior, N and log p(D | theta*) are those of the
    data without it, and the labels under -100 never matter."""
    model = make_model()
    x, y = token_data(8, seed=0)
    extra_x, _ = token_data(1, seed=5)
    ignored = torch.full((1, SEQ), -100)
    with_ignored = exact_scalla(model, "classification", 1.0).fit_posterior(
        loader(torch.cat([x, extra_x]), torch.cat([y, ignored])))
    without = exact_scalla(model, "classification", 1.0).fit_posterior(loader(x, y))
    assert with_ignored.posterior.n_data == without.posterior.n_data == int((y != -100).sum())
    torch.testing.assert_close(with_ignored.posterior.precision, without.posterior.precision, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(with_ignored.posterior.loglik_stat, without.posterior.loglik_stat)
    torch.testing.assert_close(with_ignored.log_marginal_likelihood(), without.log_marginal_likelihood())


def top_ggn_directions(model: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """The top (at most n) eigenvectors (k, P) of the GGN over every position of x, with eigenvalues above round-off.

    What ScaLLA's "eigen" directions span (its Lanczos runs on the same GGN: the pool has no targets, so every
    position counts); a dense eigh here.
    """
    jac = jacobians(model, x)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    gamma = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    values, vectors = torch.linalg.eigh(torch.einsum("btcp,btcd,btdq->pq", jac, gamma, jac))
    keep = values > 1e-9 * values[-1]
    return vectors[:, keep].flip(1)[:, :n].T


class DirectionFeatures(nn.Module):
    """phi(x, t) = V J_{x,t}^T (k, C) for fixed directions V (k, P): the features ScaLLA's targets ask for."""

    def __init__(self, model: nn.Module, directions: torch.Tensor) -> None:
        super().__init__()
        self.model, self.directions = model, directions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btcp,kp->btkc", jacobians(self.model, x), self.directions)


M = 48  # >= the 46 GGN directions above round-off of this model and data (P = 63)
FAST = dict(n_features=M, steps=500, lr=3e-3, batch_size=32, eigen_subsample=40, prior_precision=1.0,
            progress=False)


@pytest.fixture(scope="module")
def trained():
    """The default ScaLLA (eigen directions, default surrogate: the model up to its head plus a per-position head)
    trained on 40 sequences (all of them the eigen subsample), and 12 held-out sequences."""
    model = make_model()
    x, y = token_data(40, seed=0)
    s = ScaLLA(model, "classification", **FAST).fit(loader(x, y, batch=20))
    points, _ = token_data(12, seed=7)
    return s, x, y, points


def test_trained_scalla_reaches_the_kernel_of_its_targets(trained):
    """Trained, ScaLLA's per-position predictive is that of its exact target features J V^T (V the top GGN
    eigenvectors), the linearised Laplace restricted to the top-GGN subspace.

    Against the full dense LLA those features reach Spearman 0.62 only: 17 of the 63 directions have GGN
    eigenvalue ~0 (the softmax's shift invariance among them) and carry the prior variance 1/delta there, which no
    top-GGN direction sees (a limit of the "eigen" directions, outputs with positions or not; the regression test
    below, whose GGN has no such directions, compares with the dense LLA itself)."""
    s, x, y, points = trained
    pred = s.predict(points)
    torch.testing.assert_close(pred.mean, s.model(points).detach(), rtol=0, atol=0)
    directions = top_ggn_directions(s.model, x, M)
    exact = ScaLLA(s.model, "classification", n_features=len(directions), prior_precision=1.0, progress=False)
    exact.surrogate = FeatureMap(DirectionFeatures(s.model, directions), len(directions), CLASSES, position_dims=1)
    exact.n_outputs, exact.input_shape, exact.position_dims = CLASSES, (SEQ,), 1
    exact.fit_posterior(loader(x, y, batch=20))
    var, ref_var = pred.var.flatten(), exact.predict(points).var.flatten()
    rho = spearmanr(var, ref_var)[0]
    rel = float((var - ref_var).norm() / ref_var.norm())
    print(f"{len(directions)} directions; per-position variances vs exact target features: Spearman {rho:.3f}, "
          f"relative error {rel:.3f}")
    assert rho > 0.9 and rel < 0.15  # measured 0.955 / 0.948 / 0.962 and 0.068 / 0.064 / 0.062 (seeds 0 / 1 / 2)
    kernel = s.kernel(points[:3], points[3:5])
    assert kernel.shape == (3, SEQ, 2, SEQ, CLASSES, CLASSES)
    target_kernel = exact.kernel(points[:3], points[3:5])
    kernel_error = float(torch.linalg.norm(kernel - target_kernel) / torch.linalg.norm(target_kernel))
    print(f"kernel between all positions vs the targets' kernel: relative error {kernel_error:.3f}")
    assert kernel_error < 0.2  # measured 0.037 / 0.041 / 0.039 (seeds 0 / 1 / 2)


def test_trained_regression_tracks_the_dense_lla_per_position():
    """Regression (Gaussian per position and output): the GGN sum_t J_t^T J_t has no flat softmax directions, so
    the top-GGN directions span what the held-out Jacobians need and ScaLLA tracks the dense LLA itself."""
    model = make_model()
    x, _ = token_data(40, seed=0)
    y = torch.randn(40, SEQ, CLASSES, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    s = ScaLLA(model, "regression", **FAST).fit(loader(x, y, batch=20))
    points, _ = token_data(12, seed=7)
    pred = s.predict(points)
    torch.testing.assert_close(pred.mean, model(points).detach(), rtol=0, atol=0)
    ref = reference_covariance(model, x, y, points, 1.0, "regression")
    var, ref_var = pred.var.flatten(), torch.diagonal(ref, dim1=-2, dim2=-1).flatten()
    rho = spearmanr(var, ref_var)[0]
    rel = float((var - ref_var).norm() / ref_var.norm())
    print(f"regression per-position variances vs the dense LLA: Spearman {rho:.3f}, relative error {rel:.3f}")
    # measured 0.924 / 0.917 / 0.926 and 0.136 / 0.135 / 0.124 (seeds 0 / 1 / 2); 1,500 steps on 60 sequences: 0.943
    assert rho > 0.9 and rel < 0.2


def test_features_tuning_and_state_keep_positions(trained):
    s, x, y, points = trained
    assert s.features(points).shape == (12, SEQ, M, CLASSES)
    assert s.posterior.n_data == int((y != -100).sum())
    before = s.predict(points).cov
    restored = ScaLLA(s.model, "classification", n_features=M, progress=False).load_state_dict(s.state_dict())
    torch.testing.assert_close(restored.predict(points).cov, before)
    val = loader(*token_data(12, seed=9))
    delta = restored.optimize_prior_precision("gridsearch", val_loader=val, grid=torch.logspace(-2, 2, 5))
    assert delta.numel() == 1 and float(delta) > 0
    assert torch.isfinite(restored.log_marginal_likelihood())


class MeanOverTokens(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(1)


def test_default_surrogate_refuses_a_trunk_without_positions():
    torch.manual_seed(0)  # per-token outputs from one head on a pooled state, (B, D) -> (B, T·C)
    model = nn.Sequential(nn.Embedding(VOCAB, DIM), MeanOverTokens(), nn.Linear(DIM, SEQ * CLASSES),
                          nn.Unflatten(1, (SEQ, CLASSES))).to(DTYPE)
    x, y = token_data(6, seed=0)
    with pytest.raises(ValueError, match="positions.*pass surrogate="):
        ScaLLA(model, "classification", n_features=4, steps=2, progress=False).fit(loader(x, y))


def test_targets_without_positions_are_refused():
    x, y = token_data(6, seed=0)
    with pytest.raises(ValueError, match="position"):
        ScaLLA(make_model(), "classification", n_features=4, steps=2, progress=False).fit(loader(x, y[:, 0]))


@pytest.mark.parametrize("options", [dict(objective="probes"), dict(biased=True), dict(directions="rademacher")])
def test_other_objectives_and_the_biased_variant_run_on_positions(options):
    model = make_model()
    x, y = token_data(12, seed=0)
    context, _ = token_data(12, seed=3)
    s = ScaLLA(model, "classification", n_features=6, steps=5, batch_size=4, progress=False, **options)
    s.fit(loader(x, y), context_loader=[(context, torch.zeros(12, dtype=torch.long))])
    n_latent = s.n_latent
    assert s.features(x[:2]).shape == (2, SEQ, n_latent, CLASSES)
    pred = s.predict(x[:2])
    assert pred.cov.shape == (2, SEQ, CLASSES, CLASSES) and bool((pred.var > 0).all())


class PixelNet(nn.Module):
    """Per-pixel logits, channels last: a 3x3 convolution, then a head on every pixel, (B, H, W, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, DIM, 3, padding=1)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).movedim(1, -1))


def test_pixel_outputs_with_two_position_dimensions_match_the_dense_lla():
    torch.manual_seed(0)
    model = PixelNet().to(DTYPE).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 3, 4, generator=g, dtype=DTYPE)
    y = torch.randint(0, CLASSES, (6, 3, 4), generator=g)
    y[:, 0] = -100  # the first row of every image is ignored
    n_params = ParameterSubset(model, "all").n_params
    s = ScaLLA(model, "classification", n_features=n_params, prior_precision=2.0, progress=False)
    s.surrogate = FeatureMap(ExactFeatures(model), n_params, CLASSES, position_dims=2)
    s.n_outputs, s.input_shape, s.position_dims = CLASSES, (2, 3, 4), 2
    s.fit_posterior(loader(x, y, batch=3))
    assert s.posterior.n_data == 6 * 2 * 4
    points = torch.randn(2, 2, 3, 4, generator=g, dtype=DTYPE)
    jac, jac_points = jacobians(model, x), jacobians(model, points)  # (B, H, W, C, P)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    gamma = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) * (y != -100).to(DTYPE)[..., None, None]
    precision = torch.einsum("bhwcp,bhwcd,bhwdq->pq", jac, gamma, jac) + 2.0 * torch.eye(n_params, dtype=DTYPE)
    ref = torch.einsum("bhwcp,pq,bhwdq->bhwcd", jac_points, torch.linalg.inv(precision), jac_points)
    pred = s.predict(points)
    assert pred.mean.shape == (2, 3, 4, CLASSES)
    torch.testing.assert_close(pred.cov, ref, rtol=1e-7, atol=1e-10)
    assert s.kernel(points, points[:1]).shape == (2, 3, 4, 1, 3, 4, CLASSES, CLASSES)


def test_default_surrogate_keeps_the_pixels():
    torch.manual_seed(0)
    model = PixelNet().to(DTYPE).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 3, 4, generator=g, dtype=DTYPE)
    y = torch.randint(0, CLASSES, (6, 3, 4), generator=g)
    s = ScaLLA(model, "classification", n_features=5, steps=3, batch_size=4, eigen_subsample=4, progress=False)
    s.fit(loader(x, y, batch=3))
    assert s.features(x[:2]).shape == (2, 3, 4, 5, CLASSES)
    torch.testing.assert_close(s.predict(x[:2]).mean, model(x[:2]).detach(), rtol=0, atol=0)
