"""ScaLLA on two moons: a learned surrogate of the linearised-Laplace kernel, with and without context points.

    .venv/bin/python examples/scalla_context.py            # about a minute
    .venv/bin/python examples/scalla_context.py --quick    # seconds

Trains a small tanh MLP classifier on ``posthoc.data.two_moons``, then fits two ScaLLA models on it: the plain
one, and the biased one that also sees context inputs (here points drawn uniformly from a box around the data,
standing in for "inputs like the ones you will meet at test time") and is trained to keep them orthogonal to the
training data in feature space, so that their variance stays at the prior level. Maps the summed logit
variance of both over the input plane and reports the variance on the data against the variance far from it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from example_io import parse_args, write_metrics
from torch.utils.data import TensorDataset

import posthoc
from posthoc.data import make_loader, two_moons
from posthoc.models import MLP
from posthoc.plots import save_figure, uncertainty_map

BOUNDS = ((-3.0, 4.0), (-3.0, 3.5))


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.nn.Module:
    """Full-batch Adam on the cross-entropy with a weak weight decay."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    """Train the classifier, fit plain and biased ScaLLA, map their variances and report them."""
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(0)
    x, y = two_moons(n=200, noise=0.1, seed=0)
    model = train(MLP(2, hidden=(32, 32), out_features=2, activation="tanh"), x, y, steps=300 if args.quick else 2000)

    generator = torch.Generator().manual_seed(1)
    low, high = torch.tensor([b[0] for b in BOUNDS]), torch.tensor([b[1] for b in BOUNDS])
    context = low + (high - low) * torch.rand(400, 2, generator=generator)     # context inputs: a box
    train_loader = make_loader(TensorDataset(x, y), batch_size=32, shuffle=True, seed=0)
    context_loader = make_loader(TensorDataset(context, torch.zeros(len(context), dtype=torch.long)),
                                 batch_size=32, shuffle=True, seed=1)

    steps = 100 if args.quick else 1500
    fitted = {}
    for biased in (False, True):
        scalla = posthoc.ScaLLA(model, "classification", n_features=20, biased=biased, steps=steps,
                                eigen_subsample=100, n_target_points=200, progress=False, seed=0)
        scalla.fit(train_loader, context_loader=context_loader if biased else None)
        fitted["biased" if biased else "plain"] = scalla

    far = torch.tensor([[-2.5, 3.0], [3.5, -2.5], [3.5, 3.0], [-2.5, -2.5]])
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    results = {}
    for ax, (name, scalla) in zip(axes, fitted.items(), strict=True):
        def summed_variance(points: torch.Tensor, scalla: posthoc.ScaLLA = scalla) -> torch.Tensor:
            return scalla.predict(points).var.sum(-1).detach()

        uncertainty_map(summed_variance, x, y, bounds=BOUNDS, resolution=60 if args.quick else 120, ax=ax,
                        title=f"ScaLLA ({name}): summed logit variance")
        results[f"{name}_variance_on_data"] = float(summed_variance(x).mean())
        results[f"{name}_variance_far"] = float(summed_variance(far).mean())
    save_figure(figure, args.out / "scalla_context.png")
    write_metrics(args.out, "scalla_context", results)


if __name__ == "__main__":
    main()
