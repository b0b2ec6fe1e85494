"""Bayesian optimisation of a 1-D function with a Laplace MLP surrogate and an acquisition optimised by gradient.

    .venv/bin/python examples/bayesopt.py            # a few minutes (12 rounds)
    .venv/bin/python examples/bayesopt.py --quick    # seconds (3 rounds, fewer training steps)

The objective is a multimodal 1-D function on [-2, 2] (its maximum, found on a fine grid, is the target). Each
round trains a small tanh MLP on the points evaluated so far, fits a full-covariance Laplace approximation over
all its weights (``posthoc.compat.laplace.Laplace`` with ``enable_backprop=True``), tunes the prior precision
and the noise by the marginal likelihood, and maximises the upper confidence bound
UCB(x) = f_mu(x) + beta * sqrt(f_var(x)) by Adam in x from several starts: ``la(x)`` returns the noise-free
``(f_mu, f_var)`` and stays differentiable in x. The next point is the best start. The same number of uniformly
random evaluations is the baseline; the printed numbers are the simple regrets (target minus best value found).
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
from example_io import parse_args, write_metrics
from torch.utils.data import DataLoader, TensorDataset

from posthoc.compat.laplace import Laplace
from posthoc.models import MLP
from posthoc.plots import save_figure

LOWER, UPPER = -2.0, 2.0
BETA = 2.0      # UCB exploration weight
NOISE = 0.02    # observation noise of the objective


def objective(x: torch.Tensor) -> torch.Tensor:
    """The noise-free objective, (n, 1) -> (n, 1): a sine on a slope (maximum near x = 0.52) and a narrow bump near x = 1.4."""
    return torch.sin(3 * x) + 0.3 * x + 0.8 * torch.exp(-((x - 1.4) ** 2) / 0.05)


def evaluate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The objective at x (n, 1) plus N(0, NOISE^2) observation noise, (n, 1)."""
    return objective(x) + NOISE * torch.randn(x.shape, generator=generator)


def fit_surrogate(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> Laplace:
    """Train a 1-32-32-1 tanh MLP on (x, y) and return its tuned, differentiable Laplace posterior (full GGN)."""
    torch.manual_seed(seed)
    model = MLP(1, hidden=(32, 32), out_features=1, activation="tanh")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    model.eval()
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="full", enable_backprop=True)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=len(x)))
    log_prior, log_sigma = torch.zeros(1, requires_grad=True), torch.full((1,), math.log(0.1), requires_grad=True)
    hyper_optimizer = torch.optim.Adam([log_prior, log_sigma], lr=0.1)
    for _ in range(50):      # laplace-torch's evidence loop: la keeps the last values tried
        hyper_optimizer.zero_grad()
        (-la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
        hyper_optimizer.step()
    return la


def maximise_ucb(la: Laplace, starts: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Gradient ascent on UCB in x from ``starts`` uniform points (Adam, clamped to the box); the best x, (1, 1)."""
    x = (LOWER + (UPPER - LOWER) * torch.rand(starts, 1, generator=generator)).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        f_mu, f_var = la(x)                           # (starts, 1), (starts, 1, 1), differentiable in x
        ucb = f_mu.squeeze(-1) + BETA * f_var.reshape(starts).clamp_min(1e-12).sqrt()
        (-ucb.sum()).backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(LOWER, UPPER)
    with torch.no_grad():
        f_mu, f_var = la(x)
        ucb = f_mu.squeeze(-1) + BETA * f_var.reshape(starts).sqrt()
    return x.detach()[ucb.argmax()].reshape(1, 1)


def main() -> None:
    """Run BayesOpt and random search with the same budget, plot the last surrogate and the regret curves."""
    args = parse_args(__doc__.splitlines()[0])
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(0)
    rounds, train_steps, starts, ascent_steps = (3, 300, 4, 30) if args.quick else (12, 2000, 16, 100)
    grid = torch.linspace(LOWER, UPPER, 2001).unsqueeze(-1)
    target = float(objective(grid).max())

    x = LOWER + (UPPER - LOWER) * torch.rand(4, 1, generator=generator)   # the same 4 initial points for both
    x_random = x.clone()
    y = evaluate(x, generator)
    regret_bo, regret_random = [], []
    for step in range(rounds):
        la = fit_surrogate(x, y, train_steps, seed=step)
        x_next = maximise_ucb(la, starts, ascent_steps, generator)
        x, y = torch.cat([x, x_next]), torch.cat([y, evaluate(x_next, generator)])
        x_random = torch.cat([x_random, LOWER + (UPPER - LOWER) * torch.rand(1, 1, generator=generator)])
        regret_bo.append(target - float(objective(x).max()))
        regret_random.append(target - float(objective(x_random).max()))
        print(f"round {step + 1}: x = {float(x_next):+.3f}, regret BO {regret_bo[-1]:.4f}, "
              f"random {regret_random[-1]:.4f}", flush=True)

    with torch.no_grad():
        f_mu, f_var = la(grid)
    mean, std = f_mu.squeeze(-1), f_var.reshape(-1).sqrt()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(grid.squeeze(-1), objective(grid).squeeze(-1), "k--", lw=1, label="objective")
    left.plot(grid.squeeze(-1), mean, color="C0", label="surrogate mean")
    left.fill_between(grid.squeeze(-1), mean - 2 * std, mean + 2 * std, color="C0", alpha=0.25, label="±2 std")
    left.scatter(x[:-1].squeeze(-1), y[:-1].squeeze(-1), color="C3", s=14, zorder=3, label="evaluated")
    left.axvline(float(x[-1]), color="C2", lw=1, label="last proposal")
    left.set(xlabel="x", title="Laplace MLP surrogate (last round)")
    left.legend(fontsize=7)
    right.plot(range(1, rounds + 1), regret_bo, "o-", label="BayesOpt (UCB, Laplace)")
    right.plot(range(1, rounds + 1), regret_random, "s-", label="random search")
    right.set(xlabel="round", ylabel="simple regret", title="Best value found", xticks=list(range(1, rounds + 1)))
    right.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, args.out / "bayesopt.png")
    write_metrics(args.out, "bayesopt", {
        "target_max": target,
        "regret_bayesopt": regret_bo[-1],
        "regret_random": regret_random[-1],
        "evaluations": float(len(x)),
        "last_prior_precision": float(la.prior_precision.mean()),
        "last_sigma_noise": float(la.sigma_noise),
    })


if __name__ == "__main__":
    main()
