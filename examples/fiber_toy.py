"""Fiber sampling on the toy problems: a 1-D regression with a gap and two moons.

    .venv/bin/python examples/fiber_toy.py            # a few minutes
    .venv/bin/python examples/fiber_toy.py --quick    # seconds (a short walk)

For each problem a small tanh MLP is trained, then ``posthoc.FiberSampler`` walks particles from the trained
weights along directions that keep the training predictions (stage 1); stage 2 (the default, ``"pullback"``) draws
a new sample as a walked one plus one long move along the fiber, pulled back onto the low-loss set by a few
Gauss-Newton steps. The prior precision
follows the benchmarks' rule delta = 0.1 P / ||theta*||^2 and the walk's step size is 0.03 / delta. Draws the
predictive band of the regression (mean +- 2 std of f, plus the noise) and the predictive entropy over the
plane for the moons, and reports the spreads on the data, in the gap and outside it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from example_io import parse_args, write_metrics
from torch.utils.data import TensorDataset

import posthoc
from posthoc import metrics
from posthoc.data import GAP_INTERVAL, gap_regression, make_loader, two_moons
from posthoc.models import MLP
from posthoc.plots import regression_band, save_figure, uncertainty_map


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, steps: int) -> torch.nn.Module:
    """Full-batch Adam with a weak weight decay."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    return model.eval()


def sampler(model: torch.nn.Module, likelihood: str, quick: bool) -> posthoc.FiberSampler:
    """A FiberSampler over all weights with the prior and step size rule of the module docstring."""
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    prior = 0.1 * theta.numel() / float(theta.pow(2).sum())
    walk = dict(n_particles=4, steps=60, burn_in=30, thin=5) if quick else \
        dict(n_particles=16, steps=400, burn_in=200, thin=10)
    return posthoc.FiberSampler(model, likelihood, prior_precision=prior, step_size=0.03 / prior,
                                loss_tolerance=0.05, batch_size=32, cg_steps=10, **walk, n_check=16,
                                progress=False, seed=0)


def main() -> None:
    """Walk and deform on both problems, plot the predictives and report the spreads."""
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(0)
    figure, (ax_gap, ax_moons) = plt.subplots(1, 2, figsize=(12, 4.2))
    results: dict[str, float] = {}

    x, y = gap_regression(n=160, noise=0.1, seed=0)
    model = train(MLP(1, hidden=(32, 32), out_features=1, activation="tanh"), x, y,
                  torch.nn.functional.mse_loss, steps=500 if args.quick else 3000)
    fiber = sampler(model, "regression", args.quick)
    fiber.fit(make_loader(TensorDataset(x, y), batch_size=32, shuffle=False))
    x_grid = torch.linspace(-4.0, 4.0, 300).unsqueeze(-1)
    predictive = fiber.predict(x_grid, n_samples=50 if args.quick else 200, seed=0)
    spread = predictive.var.squeeze(-1).sqrt()                       # spread of f over the samples
    noisy_std = predictive.with_noise(fiber.sigma_noise).var.squeeze(-1).sqrt()
    regression_band(x_grid, predictive.mean.squeeze(-1), noisy_std, x, y, ax=ax_gap,
                    title="gap regression: stage-2 fiber samples")
    grid, (lo, hi) = x_grid.squeeze(-1), GAP_INTERVAL
    on_data = ((grid > -2) & (grid < lo)) | ((grid > hi) & (grid < 2))
    results["gap_spread_on_data"] = float(spread[on_data].mean())
    results["gap_spread_in_gap"] = float(spread[(grid > lo) & (grid < hi)].mean())
    results["gap_spread_outside"] = float(spread[grid.abs() > 3].mean())
    results["gap_stage2_within_tolerance"] = float(fiber.info["stage2_within_tol"])

    x, y = two_moons(n=200, noise=0.1, seed=0)
    model = train(MLP(2, hidden=(32, 32), out_features=2, activation="tanh"), x, y,
                  torch.nn.functional.cross_entropy, steps=500 if args.quick else 3000)
    fiber = sampler(model, "classification", args.quick)
    fiber.fit(make_loader(TensorDataset(x, y), batch_size=32, shuffle=False))
    n_samples = 30 if args.quick else 100

    def predictive_entropy(points: torch.Tensor) -> torch.Tensor:
        return metrics.entropy(fiber.predict(points, n_samples=n_samples, seed=0).probs())

    uncertainty_map(predictive_entropy, x, y, resolution=50 if args.quick else 120, ax=ax_moons,
                    title="two moons: predictive entropy of stage-2 samples")
    far = torch.tensor([[-2.5, 3.0], [3.5, -2.5], [3.5, 3.0], [-2.5, -2.5]])
    results["moons_entropy_on_data"] = float(predictive_entropy(x).mean())
    results["moons_entropy_far"] = float(predictive_entropy(far).mean())
    results["moons_stage2_within_tolerance"] = float(fiber.info["stage2_within_tol"])
    save_figure(figure, args.out / "fiber_toy.png")
    write_metrics(args.out, "fiber_toy", results)


if __name__ == "__main__":
    main()
