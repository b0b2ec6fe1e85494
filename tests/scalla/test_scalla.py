"""ScaLLA on a small float64 MLP against the exact NTK and the exact LLA (tests/scalla/conftest.py)."""

import math

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import TensorDataset

from posthoc.curvature.jacobians import per_example_jacobians
from posthoc.data.loaders import make_loader
from posthoc.laplace.function_space import exact_lla
from posthoc.models.cnn import FMNISTCNN
from posthoc.network.subset import ParameterSubset
from posthoc.scalla import ScaLLA, build_default_surrogate
from posthoc.scalla.objectives import relative_kernel_error
from posthoc.scalla.surrogate import FeatureMap

DTYPE = torch.float64
# Fast settings for the 1,315-parameter MLP: 3,400 target points (capped by the data: 400 train, 1,700 context),
# the default 100 top-GGN eigenvector directions, Adam 3e-3 cosine (2,000 steps instead of 3,000), and a 500-unit
# surrogate head (the default 200 underfits the small-eigenvalue directions that set in-distribution variances).
FAST = dict(n_features=100, steps=2000, batch_size=64, lr=3e-3, n_target_points=3400, directions="eigen",
            surrogate_hidden=500, progress=False)


@pytest.fixture(scope="module")
def held_out(mlp_problem):
    points = torch.cat([mlp_problem.x_test[:30], mlp_problem.x_ood[:30]])
    return points, per_example_jacobians(ParameterSubset(mlp_problem.model, "all"), points)


@pytest.fixture(scope="module")
def fitted(mlp_problem, held_out):
    points, jac = held_out
    errors = []
    s = ScaLLA(mlp_problem.model, "classification", **FAST)

    def record(step, evals):
        if step in (1, 100, FAST["steps"]):
            errors.append((step, evals, relative_kernel_error(s.surrogate.eval()(points).detach(), jac)))
            s.surrogate.train()

    s.fit(mlp_problem.train_loader, mlp_problem.context_loader, callback=record)
    return s, errors


@pytest.fixture(scope="module")
def fitted_biased(mlp_problem):
    s = ScaLLA(mlp_problem.model, "classification", biased=True, **FAST)
    return s.fit(mlp_problem.train_loader, mlp_problem.context_loader)


def test_held_out_kernel_error_falls(fitted):
    s, errors = fitted
    info = s.bench_info()  # what a bench row records: the budget the callback saw, the objective
    assert info["jvp_evaluations"] == errors[-1][1] and info["steps"] == FAST["steps"]
    assert info["objective"] == "directions" and "history" not in info
    print("held-out kernel error (step, JVP evaluations, error):", errors)
    (_, _, first), (_, _, mid), (_, _, last) = errors
    assert last < mid < first
    # exact rank-100 eigen features reach 0.14 on these points (Rademacher 0.20); the learned eigen ones reach
    # 0.352 / 0.386 (seeds 0 / 1; 0.42-0.44 with the default 200-unit head): the learning, not the directions,
    # limits them
    assert last < 0.5


def test_predictive_variances_track_the_exact_lla(mlp_problem, fitted):
    s, _ = fitted
    ref_id, ref_ood = mlp_problem.exact_var(mlp_problem.x_test), mlp_problem.exact_var(mlp_problem.x_ood)
    var_id, var_ood = s.predict(mlp_problem.x_test).var, s.predict(mlp_problem.x_ood).var
    rho_id = spearmanr(var_id.flatten(), ref_id.flatten())[0]
    rho_ood = spearmanr(var_ood.flatten(), ref_ood.flatten())[0]
    rho_all = spearmanr(torch.cat([var_id, var_ood]).flatten(), torch.cat([ref_id, ref_ood]).flatten())[0]
    print(f"Spearman vs exact LLA: ID {rho_id:.3f}, OOD {rho_ood:.3f}, pooled {rho_all:.3f}")
    assert rho_ood >= 0.9 and rho_all >= 0.9  # measured OOD 0.966 / 0.966, pooled 0.938 / 0.939 (seeds 0 / 1)
    # The goal on ID points alone. Their variances are set by the small-GGN-eigenvalue directions: measured
    # 0.921 / 0.922 (seeds 0 / 1; seed 2: 0.910) with the 500-unit head, where the default 200-unit head gave
    # 0.876 / 0.862 and would fail, as would Rademacher directions (0.66-0.82); exact rank-100 eigen features: 0.967.
    assert rho_id >= 0.9


def test_biased_variant_raises_context_variance_and_keeps_training_variance(mlp_problem, fitted, fitted_biased):
    s, _ = fitted
    train_u = s.predict(mlp_problem.x).var.sum(-1)
    train_b = fitted_biased.predict(mlp_problem.x).var.sum(-1)
    ood_u = s.predict(mlp_problem.x_ood).var.sum(-1)
    ood_b = fitted_biased.predict(mlp_problem.x_ood).var.sum(-1)
    train_ratio = float(train_b.mean() / train_u.mean())
    ood_ratio = float(ood_b.mean() / ood_u.mean())
    print(f"biased / unbiased mean variance: training points {train_ratio:.3f}, context-like points {ood_ratio:.3f}")
    # the biased surrogate has m + h features: the training points keep the unbiased targets (rank m), the context
    # points get h = 20 extra ones, so the training-point kernel is the unbiased one up to learning error.
    assert fitted_biased.surrogate(mlp_problem.x[:2]).shape == (2, 120, 3)
    assert ood_ratio > 1.5  # measured 2.73 / 3.32 (seeds 0 / 1)
    # the band; measured 0.999 / 0.965 (seeds 0 / 1; 0.975 / 0.966 with the 200-unit head). With the m
    # features split between the groups
    # (the previous design) it was 0.76-0.80, with m + h features but uniform target draws 0.85-0.90.
    assert abs(train_ratio - 1) < 0.1


def test_posterior_and_predictive_equal_the_exact_lla_for_exact_features(mlp_problem):
    # With phi(x) = J(x)^T (m = P) the latent model is the linearised network: ScaLLA's posterior and
    # predictive must equal the exact GP-form LLA to round-off, for classification and for regression.
    model = mlp_problem.model
    subset = ParameterSubset(model, "all")

    class ExactFeatures(nn.Module):
        def forward(self, x):
            return per_example_jacobians(subset, x).permute(0, 2, 1)  # (B, P, C)

    for likelihood, sigma in (("classification", 1.0), ("regression", 0.7)):
        s = ScaLLA(model, likelihood, n_features=subset.n_params, prior_precision=2.0, sigma_noise=sigma,
                   progress=False)
        s.surrogate, s.n_outputs, s.input_shape = FeatureMap(ExactFeatures(), subset.n_params, 3), 3, (4,)
        y = mlp_problem.y if likelihood == "classification" else torch.randn(400, 3, dtype=DTYPE)
        s.fit_posterior(make_loader(TensorDataset(mlp_problem.x, y), 128, shuffle=False))
        ref = exact_lla(subset, mlp_problem.x, mlp_problem.x_ood[:10], likelihood, 2.0, sigma_noise=sigma)
        pred = s.predict(mlp_problem.x_ood[:10])
        torch.testing.assert_close(pred.cov, ref.cov, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(pred.mean, ref.mean)


def test_evidence_hybrid_has_an_optimum_and_latent_does_not(fitted):
    s, _ = fitted
    deltas = torch.logspace(-3, 6, 10, dtype=DTYPE)
    latent = torch.stack([s.log_marginal_likelihood(d, kind="latent") for d in deltas])
    assert bool((latent[1:] > latent[:-1]).all())  # grows without bound in delta
    delta = s.optimize_prior_precision(method="marglik", n_steps=400, lr=0.1)
    post = s.posterior
    # stationarity of the hybrid in delta: P / delta - ||theta||^2 - sum 1 / (lam + delta) = 0
    grad = post.n_params / delta - post.theta_sq_norm - (1 / (post.eigenvalues + delta)).sum()
    assert abs(float(grad)) < 1e-3 * post.n_params / float(delta)
    hybrid = lambda d: float(s.log_marginal_likelihood(torch.tensor(d, dtype=DTYPE)))  # noqa: E731
    assert hybrid(float(delta)) > max(hybrid(float(delta) * 2), hybrid(float(delta) / 2))
    s.prior_precision = 1.0


def test_gridsearch_picks_the_lowest_validation_nll(mlp_problem, fitted):
    s, _ = fitted
    grid = torch.tensor([0.01, 1.0, 100.0], dtype=DTYPE)
    x_val, y_val = mlp_problem.val_loader.dataset.tensors
    nlls = []
    for d in grid:
        s.prior_precision = d
        p = s.predict(x_val).probs("probit")
        nlls.append(float(-torch.log(p[torch.arange(len(y_val)), y_val]).mean()))
    best = s.optimize_prior_precision(method="gridsearch", val_loader=mlp_problem.val_loader, grid=grid)
    assert float(best) == float(grid[int(torch.tensor(nlls).argmin())])
    s.prior_precision = 1.0


def test_kernel_and_state_dict_round_trip(mlp_problem, fitted):
    s, _ = fitted
    x1, x2 = mlp_problem.x_test[:5], mlp_problem.x_ood[:4]
    k = s.kernel(x1, x2)
    assert k.shape == (5, 4, 3, 3)
    phi1, phi2 = s.features(x1), s.features(x2)
    torch.testing.assert_close(k[2, 1], phi1[2].T @ phi2[1])
    copy = ScaLLA(mlp_problem.model, "classification", **FAST).load_state_dict(s.state_dict())
    torch.testing.assert_close(copy.predict(x2).cov, s.predict(x2).cov)
    with pytest.raises(ValueError, match="surrogate_hidden=500"):
        ScaLLA(mlp_problem.model, "classification", **{**FAST, "surrogate_hidden": 200}).load_state_dict(s.state_dict())


def test_default_surrogate_for_the_fmnist_cnn():
    torch.manual_seed(0)
    model = FMNISTCNN().eval()
    x = torch.rand(2, 1, 28, 28)
    for init in ("model", "fresh"):
        surrogate = build_default_surrogate(model, x, n_features=7, n_outputs=10, init=init, seed=123)
        assert surrogate(x).shape == (2, 7, 10)
        assert math.isclose(float(surrogate.scale), math.sqrt(140_594 / 7), rel_tol=1e-6)
        same = torch.equal(surrogate.trunk.conv1.weight, model.conv1.weight)
        assert same == (init == "model")
        surrogate.trunk.conv1.weight.data.add_(1.0)  # a copy: the network is untouched
        assert not torch.equal(surrogate.trunk.conv1.weight, model.conv1.weight)


def test_bench_methods_are_registered():
    import posthoc.bench.scalla_methods  # noqa: F401
    from posthoc.bench.methods import METHODS

    assert {"scalla", "scalla_biased"} <= set(METHODS)
