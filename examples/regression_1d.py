"""1-D regression with a gap in the data: a linearised (glm) Laplace predictive band around a small MLP.

    .venv/bin/python examples/regression_1d.py            # under a minute
    .venv/bin/python examples/regression_1d.py --quick    # a few seconds (a 1-20-20-1 MLP, fewer steps)

Trains a tanh MLP on ``posthoc.data.gap_regression`` (inputs in [-2, -0.75] and [0.75, 2], none in between),
fits a full-covariance Laplace approximation over all weights, tunes the prior precision and the noise by the
marginal likelihood, and draws the predictive of y (mean +- 2 std). The band should widen in the gap and
outside the data; the printed numbers compare the predictive std there with the std on the data.
"""

from __future__ import annotations

import torch
from example_io import parse_args, write_metrics
from torch.utils.data import TensorDataset

import posthoc
from posthoc.data import GAP_INTERVAL, gap_regression, make_loader
from posthoc.models import MLP
from posthoc.plots import regression_band, save_figure


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.nn.Module:
    """Full-batch Adam on the mean squared error (the MAP of a Gaussian likelihood, weak weight decay)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    """Train, fit the Laplace approximation, tune it, plot the band and report the spreads."""
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)   # float64: a full posterior over 2,701 weights needs it to resolve delta
    x, y = (t.double() for t in gap_regression(n=160, noise=0.1, seed=0))
    x_test, y_test = (t.double() for t in gap_regression(n=200, noise=0.1, seed=1))
    hidden, steps = ((20, 20), 300) if args.quick else ((50, 50), 3000)
    model = train(MLP(1, hidden=hidden, out_features=1, activation="tanh"), x, y, steps=steps)

    la = posthoc.Laplace(model, "regression", subset_of_weights="all", hessian_structure="full", progress=False)
    la.fit(make_loader(TensorDataset(x, y), batch_size=32, shuffle=False))   # one pass: the exact GGN
    la.optimize_prior_precision(method="marglik", n_steps=30 if args.quick else 100)   # delta, sigma: evidence

    x_grid = torch.linspace(-4.0, 4.0, 400).unsqueeze(-1)
    predictive = la.predict(x_grid).with_noise(la.sigma_noise)               # GaussianPredictive of y
    std = predictive.var.squeeze(-1).sqrt()
    figure = regression_band(x_grid, predictive.mean.squeeze(-1), std, x, y,
                             title="Laplace (all weights, full GGN), glm predictive")
    save_figure(figure, args.out / "regression_1d.png")

    lo, hi = GAP_INTERVAL
    grid = x_grid.squeeze(-1)
    on_data = ((grid > -2) & (grid < lo)) | ((grid > hi) & (grid < 2))
    write_metrics(args.out, "regression_1d", {
        "prior_precision": float(la.prior_precision.mean()),
        "sigma_noise": float(la.sigma_noise),
        "std_on_data": float(std[on_data].mean()),
        "std_in_gap": float(std[(grid > lo) & (grid < hi)].mean()),
        "std_outside": float(std[grid.abs() > 3].mean()),
        "test_nll": float(-la.predict(x_test).with_noise(la.sigma_noise).log_prob(y_test).mean()),
    })


if __name__ == "__main__":
    main()
