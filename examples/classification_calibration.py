"""Calibration and out-of-distribution detection on the shipped Fashion-MNIST subset: MAP against Laplace.

    .venv/bin/python examples/classification_calibration.py            # several minutes on 2 CPU cores
    .venv/bin/python examples/classification_calibration.py --quick    # seconds (1 epoch, small subsets)

Trains the FMNIST CNN on the embedded subset (``posthoc.data.get_suite("fmnist-embedded")``, no download),
fits an all-weights KFAC Laplace approximation, picks the prior precision by validation NLL (grid search on the
validation split, never the test set), and compares MAP and Laplace on the test set: NLL, ECE and the OOD
AUROC of the predictive entropy against the embedded KMNIST images. Saves a reliability diagram and the
entropy histograms of both methods.
"""

from __future__ import annotations

import torch
from example_io import first, parse_args, write_metrics

import posthoc
from posthoc import metrics
from posthoc.data import get_suite, make_loader
from posthoc.models import build_model
from posthoc.models.training import TrainConfig, train_map
from posthoc.plots import ood_histograms, reliability_diagram, save_figure


def main() -> None:
    """Train the MAP model, fit and tune the Laplace approximation, evaluate both and plot."""
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(0)
    suite = get_suite("fmnist-embedded")
    n_train, n_val, n_test = (500, 200, 300) if args.quick else (len(suite.train), len(suite.val), len(suite.test))
    train, val = first(suite.train, n_train), first(suite.val, n_val)
    x_test, y_test = (t[:n_test] for t in suite.test.tensors)
    x_ood = suite.ood.tensors[0][:n_test]

    config = TrainConfig(epochs=1 if args.quick else 5, seed=0)
    model = train_map(build_model("fmnist_cnn"), train, config, progress=False).model

    la = posthoc.Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", progress=False)
    la.fit(make_loader(train, batch_size=64, shuffle=False))
    la.optimize_prior_precision(method="gridsearch", val_loader=make_loader(val, batch_size=100, shuffle=False),
                                grid_size=5 if args.quick else 21)

    methods = {"MAP": posthoc.MAP(model), "Laplace (KFAC, all weights)": la}
    results, bins, histograms = {}, {}, {}
    for name, method in methods.items():
        probs = method.predict(x_test).probs("probit")
        probs_ood = method.predict(x_ood).probs("probit")
        key = "map" if name == "MAP" else "laplace"
        results[f"{key}_accuracy"] = metrics.accuracy(probs, y_test)
        results[f"{key}_nll"] = metrics.nll(probs, y_test)
        results[f"{key}_ece"] = metrics.ece(probs, y_test)
        scores_in, scores_out = metrics.entropy(probs), metrics.entropy(probs_ood)
        results[f"{key}_ood_auroc_entropy"] = metrics.auroc(scores_in, scores_out)
        bins[name] = metrics.calibration_bins(probs, y_test)
        histograms[name] = (scores_in, scores_out)
    results["laplace_prior_precision"] = float(la.prior_precision.mean())

    save_figure(reliability_diagram(bins, title="Fashion-MNIST (embedded subset), test"),
                args.out / "classification_reliability.png")
    for name, (scores_in, scores_out) in histograms.items():
        stem = "map" if name == "MAP" else "laplace"
        figure = ood_histograms(scores_in, scores_out, labels=("Fashion-MNIST", "KMNIST"), title=name)
        save_figure(figure, args.out / f"classification_ood_{stem}.png")
    write_metrics(args.out, "classification_calibration", results)


if __name__ == "__main__":
    main()
