#!/usr/bin/env python
"""benchmarks/defaults.py's recipes on the two large models (issue 17), for the methods that scale: low rank.

Models: the embedded FMNIST CNN (``posthoc bench --suite fmnist-embedded``'s MAP checkpoint; OOD: its KMNIST
set) and the MNIST MLP 784-128-64-10 of benchmarks/streamlined_mnist_mlp.py (seed 0, its checkpoint in
``runs/streamlined_mnist``, trained there if absent; test: MNIST test, OOD: Fashion-MNIST test).

Rows: ``map`` and ``la_lowrank[link]``: the default recipe ``Laplace(model, "classification", "all",
"lowrank").fit(train)`` (its defaults: ELLA's span, complement omitted; ``rank=20`` and, as the bench's
la_lowrank row, ``subsample=1000`` for the Lanczos products), ``optimize_prior_precision()`` at its defaults
(no validation data: the omitted posterior's evidence), then the glm predictive under each link. The fitted
Laplace state and every finished task's rows are cached under ``--run-dir`` (default runs/defaults_large/): a
rerun only computes what is missing. Writes ``<run-dir>/rows.json`` in defaults.json's task format, which
``benchmarks/defaults.py --merge-from`` joins with the other tasks.

Usage (from the repository root):
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/defaults_large.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from posthoc import metrics
from posthoc.data import load_images
from posthoc.data.loaders import make_loader
from posthoc.laplace import Laplace
from posthoc.models import MLP
from posthoc.models.training import TrainConfig, train_map
from posthoc.utils.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
LINKS = ("probit", "probit_centred", "mc")
BATCH = 500
LOWRANK_OPTIONS = {"rank": 20, "subsample": 1000, "basis": "jacobian"}  # basis named: the default, no warning


def embedded_cnn(data_dir: str | None) -> tuple[torch.nn.Module, dict[str, TensorDataset]]:
    """The embedded FMNIST CNN's MAP (the bench's checkpoint) and its train, test and OOD sets."""
    from posthoc.bench.runner import train_suite_model
    from posthoc.bench.suites import get_bench_suite
    from posthoc.data.suites import get_suite

    bench = get_bench_suite("fmnist-embedded")
    suite = get_suite(bench.data, data_dir=data_dir)
    model = train_suite_model(bench, suite, bench.train, None, False, lambda message: None).model.eval()
    return model, {"train": suite.train, "test": suite.test, "ood": suite.ood}


def mnist_mlp(data_dir: str | None) -> tuple[torch.nn.Module, dict[str, TensorDataset]]:
    """benchmarks/streamlined_mnist_mlp.py's seed-0 MAP (784-128-64-10, ReLU, 10 epochs) and MNIST / FMNIST."""
    train = TensorDataset(*load_images("MNIST", "train", data_dir))
    torch.manual_seed(0)
    untrained = MLP(784, (128, 64), 10, "relu")
    config = TrainConfig(epochs=10, batch_size=128, lr=1e-3, gamma=1.0, seed=0)
    model = train_map(untrained, train, config, checkpoint_dir=REPO / "runs" / "streamlined_mnist",
                      key=f"mnist_mlp128-64-n{len(train)}-e10-s0", log=lambda message: None).model.eval()
    return model, {"train": train, "test": TensorDataset(*load_images("MNIST", "test", data_dir)),
                   "ood": TensorDataset(*load_images("FashionMNIST", "test", data_dir))}


TASKS = {"fmnist-embedded-cnn": embedded_cnn, "mnist-mlp": mnist_mlp}


def _row(name: str, probs: torch.Tensor, y: torch.Tensor, probs_ood: torch.Tensor, extra: dict[str, Any]
         ) -> dict[str, Any]:
    """benchmarks/defaults.py's metrics: accuracy, NLL, ECE (15 bins), entropy OOD AUROC."""
    return {"method": name, "accuracy": metrics.accuracy(probs, y), "nll": metrics.nll(probs, y),
            "ece": metrics.calibration_bins(probs, y).ece,
            "auroc_entropy": metrics.auroc(metrics.entropy(probs), metrics.entropy(probs_ood)), **extra}


def run_task(name: str, data_dir: str | None, run_dir: Path) -> list[dict[str, Any]]:
    """MAP and la_lowrank[link] rows of one model; the fitted Laplace state cached in ``run_dir``."""
    model, data = TASKS[name](data_dir)
    t0 = time.perf_counter()
    la = Laplace(model, "classification", "all", "lowrank", progress=False, structure_options=LOWRANK_OPTIONS)
    state_path = run_dir / f"{name}-lowrank.pt"
    if state_path.is_file():
        la.load_state_dict(torch.load(state_path, weights_only=False))
    else:
        la.fit(make_loader(data["train"], BATCH, shuffle=False))
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(la.state_dict(), state_path)
    fit_s = time.perf_counter() - t0
    la.optimize_prior_precision()
    extra = {"prior_precision": float(la.prior_precision.mean()), "fit_s": fit_s}
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    for split in ("test", "ood"):
        logits: list[torch.Tensor] = []
        probs: dict[str, list[torch.Tensor]] = {link: [] for link in LINKS}
        for x, _ in make_loader(data[split], BATCH, shuffle=False):
            pred = la.predict(x)
            logits.append(pred.mean.detach())
            for link in LINKS:
                probs[link].append(pred.probs(link, n_samples=1000, seed=0).detach())
        outputs[split] = {"map": torch.cat(logits).softmax(-1), **{k: torch.cat(v) for k, v in probs.items()}}
    y = data["test"].tensors[1]
    rows = [_row("map", outputs["test"]["map"], y, outputs["ood"]["map"], {})]
    rows += [_row(f"la_lowrank[{link}]", outputs["test"][link], y, outputs["ood"][link], extra) for link in LINKS]
    return rows


def main(argv: list[str] | None = None) -> None:
    """Run (or read from the cache) each model's rows and write ``<run-dir>/rows.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="root of FashionMNIST/MNIST/KMNIST; default $POSTHOC_DATA")
    parser.add_argument("--tasks", nargs="*", choices=tuple(TASKS), default=list(TASKS))
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "defaults_large")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = args.run_dir / "rows.json"
    payload = json.loads(out.read_text()) if out.is_file() else {"tasks": {}}
    for name in args.tasks:
        if name in payload["tasks"]:
            continue
        print(f"task {name}", flush=True)
        payload["tasks"][name] = run_task(name, args.data_dir, args.run_dir)
        args.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(payload, indent=1))
        for row in payload["tasks"][name]:
            print(row, flush=True)


if __name__ == "__main__":
    main()
