"""Streamlined moment propagation on a trained CNN: a sampling-free predictive in one forward pass.

    .venv/bin/python examples/streamlined_pretrained.py            # a few minutes
    .venv/bin/python examples/streamlined_pretrained.py --quick    # seconds

Trains ``build_model("fmnist_cnn")`` (three Conv-ReLU-MaxPool blocks, two linear layers) on the embedded
Fashion-MNIST subset as a stand-in for a pretrained network, fits a diagonal Laplace posterior over all
its weights (one data pass), and pushes that posterior through the network with ``posthoc.Streamlined``: no
sampling, no Jacobians. The one output-variance scale is fitted on the validation split. Compares MAP, the
unscaled and the scaled streamlined predictive and the Monte Carlo predictive of the same posterior (weight
samples, ``pred_type="nn"``) on the test set, and saves their reliability diagram.
"""

from __future__ import annotations

import time

import torch
from example_io import first, parse_args, write_metrics

import posthoc
from posthoc import metrics
from posthoc.data import get_suite, make_loader
from posthoc.models import build_model
from posthoc.models.training import TrainConfig, train_map
from posthoc.plots import reliability_diagram, save_figure


def main() -> None:
    """Train the CNN, fit the diagonal Laplace posterior, compare the predictives and plot."""
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(0)
    suite = get_suite("fmnist-embedded")
    n_train, n_val, n_test = (500, 200, 300) if args.quick else (len(suite.train), len(suite.val), len(suite.test))
    train, val = first(suite.train, n_train), first(suite.val, n_val)
    x_test, y_test = (t[:n_test] for t in suite.test.tensors)

    model = train_map(build_model("fmnist_cnn"), train, TrainConfig(epochs=1 if args.quick else 5, seed=0),
                      progress=False).model
    la = posthoc.Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag", progress=False)
    la.fit(make_loader(train, batch_size=64, shuffle=False))
    la.optimize_prior_precision(method="marglik")

    streamlined = posthoc.Streamlined(model, posterior=la)   # diagonal activation covariances (the default)
    start = time.perf_counter()
    unscaled = streamlined.predict(x_test).probs("probit")
    seconds = time.perf_counter() - start
    scale = streamlined.fit_variance_scale(make_loader(val, batch_size=100, shuffle=False))
    scaled = streamlined.predict(x_test).probs("probit")
    start = time.perf_counter()
    sampled = la.predict(x_test, pred_type="nn", n_samples=10 if args.quick else 100, seed=0).probs()
    sampled_seconds = time.perf_counter() - start

    predictives = {"MAP": posthoc.MAP(model).predict(x_test).probs(), "Streamlined": unscaled,
                   "Streamlined, scaled": scaled, "Laplace, weight samples": sampled}
    results: dict[str, float] = {"variance_scale": scale, "streamlined_predict_s": seconds,
                                 "sampled_predict_s": sampled_seconds}
    for name, probs in predictives.items():
        key = name.lower().replace(", ", "_").replace(" ", "_")
        results[f"{key}_nll"] = metrics.nll(probs, y_test)
        results[f"{key}_ece"] = metrics.ece(probs, y_test)
    bins = {name: metrics.calibration_bins(probs, y_test) for name, probs in predictives.items()}
    save_figure(reliability_diagram(bins, title="FMNIST CNN (embedded subset), test"),
                args.out / "streamlined_reliability.png")
    write_metrics(args.out, "streamlined_pretrained", results)


if __name__ == "__main__":
    main()
