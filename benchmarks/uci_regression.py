"""UCI regression, the full protocol: MAP, LA kron (marglik), streamlined, ScaLLA and fiber on the same MAP.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/uci_regression.py --data-dir DATA \
        [--run-dir runs/uci_regression] [--datasets ...] [--methods ...] [--max-splits N] [--time-budget S] \
        [--report-only]

Protocol: the 9 standard UCI sets and their standard splits (20 each, 5 for protein-tertiary-structure); an
MLP d-50-1 ReLU trained on the training split with inputs and targets standardised on it (Adam 1e-3, batch 32,
weight decay 1e-4, max(20 epochs, about 6,000 steps), seeded by the split index; posthoc.bench.uci); test NLL
(mean -log p(y)) and RMSE in original units; mean ± standard error over the splits done. No validation split:
every hyperparameter comes from the training data.

Methods (all on the same MAP of each split):
- map: N(f(x), sigma^2) with sigma the MAP's training residual RMS (the noise's maximum likelihood given f).
- la_kron: Laplace over all weights, KFAC GGN, scalar prior precision and sigma_noise by 100 Adam steps of
  marginal-likelihood ascent (posthoc's default start), glm predictive plus noise.
- streamlined: that LA kron posterior (same prior precision and noise) propagated through the network by
  posthoc.streamlined.Streamlined with diagonal activation covariance (the authors' rule), plus noise; no
  variance scale fitted (that needs a validation set). streamlined_full: the same with the full 50 x 50
  activation covariance carried through the hidden layer.
- scalla: posthoc.scalla.ScaLLA defaults (m = 100 features, "directions" objective with the top 100 GGN
  eigenvectors from Lanczos on 200 training points, targets topped up with jittered training inputs to 2,000
  points, 3,000 Adam steps of 64 points, surrogate trunk from the model, seed = split index), then prior
  precision and sigma_noise by 200 Adam steps on the hybrid evidence (optimize_prior_precision("marglik")),
  starting from delta = 1, sigma = 1; predictive plus noise.
- fiber: benchmarks/fiber_uci.py's settings (posthoc.bench.uci.fiber_uci_sampler): all weights, delta =
  0.1 P / ||theta*||^2, noise the MAP's training residual RMS, 8 particles x 200 steps, loss check on all
  training points, 200 MC samples, mixture predictive with noise; stage 2 the coupling flow (deform="flow", the
  library's default when these runs began).
- fiber_pullback: the same walk with the library's default stage 2 now, deform="pullback" (every stage-2 sample a
  walked one moved and pulled back onto the low-loss set).

DATA: the folder holding UCI/ (or set $POSTHOC_DATA). Every (dataset, split, method) result is one JSON under
--run-dir with the split's MAP weights beside it; a rerun skips finished cells, and the cells already in
benchmarks/results/uci_regression.json are imported into --run-dir first, so a fresh machine resumes. Order: map,
la_kron and the streamlined rows on every split first, then scalla and fiber split by split across the data sets.
Writes benchmarks/results/uci_regression.{json,md} from whatever cells exist.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from posthoc import Laplace
from posthoc.bench.report import run_meta, write_json, write_markdown_keeping_notes
from posthoc.bench.uci import UCICellCache, fiber_uci_sampler, original_units, residual_sigma, summarise
from posthoc.data.paths import resolve_data_dir
from posthoc.data.uci import UCI_DATASETS, UCISplit, load_uci, n_splits
from posthoc.predictive.base import Predictive
from posthoc.predictive.gaussian import GaussianPredictive
from posthoc.scalla import ScaLLA
from posthoc.streamlined import Streamlined

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
CHEAP = ("map", "la_kron", "streamlined", "streamlined_full")
EXPENSIVE = ("scalla", "fiber", "fiber_pullback")
METHODS = CHEAP + EXPENSIVE
NOTES = "## Notes"


def _la_kron(model: torch.nn.Module, loader: DataLoader) -> Laplace:
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="kron", progress=False)
    la.fit(loader)
    la.optimize_prior_precision(method="marglik", n_steps=100)
    return la


def run_method(method: str, model: torch.nn.Module, split: UCISplit) -> dict[str, Any]:
    """One method's test NLL/RMSE (original units), fit seconds and fitted hyperparameters on one split."""
    loader = DataLoader(TensorDataset(split.x_train, split.y_train), batch_size=256, shuffle=False)
    start = time.perf_counter()
    row: dict[str, Any] = {}
    pred: Predictive
    if method == "map":
        sigma = residual_sigma(model, split.x_train, split.y_train)
        with torch.no_grad():
            pred = GaussianPredictive(model(split.x_test), var=torch.zeros(split.x_test.shape[0], 1)).with_noise(sigma)
        row["sigma_noise"] = sigma
    elif method == "la_kron":
        la = _la_kron(model, loader)
        pred = la.predict(split.x_test).with_noise(la.sigma_noise)
        row.update(prior_precision=float(la.prior_precision.mean()), sigma_noise=float(la.sigma_noise))
    elif method in ("streamlined", "streamlined_full"):
        la = _la_kron(model, loader)
        mode = "full" if method == "streamlined_full" else "diagonal"
        pred = Streamlined(model, la, activation_covariance=mode).predict(split.x_test).with_noise(la.sigma_noise)
        row.update(prior_precision=float(la.prior_precision.mean()), sigma_noise=float(la.sigma_noise))
    elif method == "scalla":
        scalla = ScaLLA(model, "regression", progress=False, seed=split.split)
        scalla.fit(loader)
        scalla.optimize_prior_precision(method="marglik")
        pred = scalla.predict(split.x_test).with_noise(scalla.sigma_noise)
        row.update(prior_precision=float(scalla.prior_precision), sigma_noise=float(scalla.sigma_noise))
    elif method in ("fiber", "fiber_pullback"):
        deform = "pullback" if method == "fiber_pullback" else "flow"
        sampler = fiber_uci_sampler(model, split.x_train.shape[0], split.split, deform=deform)
        sampler.fit(loader)
        pred = sampler.predict(split.x_test, n_samples=200).with_noise(sampler.sigma_noise)
        row.update(prior_precision=float(sampler.prior_precision), sigma_noise=float(sampler.sigma_noise),
                   stage2_within_tol=float(sampler.bench_info()["stage2_within_tol"]))
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    with torch.no_grad():
        row["nll"], row["rmse"] = original_units(pred, split)
    row["fit_s"] = time.perf_counter() - start
    return row


def _with(extra: dict[str, Any], compute: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    return {**extra, **compute(*args)}


def run_cells(cache: UCICellCache, datasets: list[str], methods: list[str], data_dir: str, max_splits: int | None,
              deadline: float, log: Callable[[str], None] = print) -> None:
    """Run every missing cell: the cheap methods on all splits, then the expensive ones split by split."""
    totals = {d: n_splits(d, data_dir) if max_splits is None else min(max_splits, n_splits(d, data_dir))
              for d in datasets}
    cheap = [m for m in methods if m in CHEAP]
    expensive = [m for m in methods if m in EXPENSIVE]
    plan = [(d, i, cheap) for d in datasets for i in range(totals[d])]
    plan += [(d, i, expensive) for i in range(max(totals.values())) for d in datasets if i < totals[d]]
    for dataset, index, group in plan:
        todo = [m for m in group if not cache.has(dataset, index, m)]
        if not todo:
            continue
        if time.time() > deadline:
            log("time budget spent; stopping (rerun to continue)")
            return
        split = load_uci(dataset, index, data_dir=data_dir)
        model, info = cache.map_model(split)
        for method in todo:
            extra = info if method == "map" else {"n_train": info["n_train"]}  # MAP training time: in map's cell
            row = cache.run(dataset, index, method, functools.partial(_with, extra, run_method, method, model, split))
            log(json.dumps(row))


def table(summary: list[dict[str, Any]], datasets: list[str], methods: list[str],
          totals: dict[str, int]) -> list[str]:
    """The markdown table: per dataset and method, splits done / standard, NLL and RMSE mean ± SE, fit seconds."""
    lines = ["| dataset | method | n_splits | test NLL | test RMSE | fit s |", "|---|---|---|---|---|---|"]
    by_cell = {(r["dataset"], r["method"]): r for r in summary}
    for dataset in datasets:
        for method in methods:
            r = by_cell.get((dataset, method))
            if r is None:
                lines.append(f"| {dataset} | {method} | 0/{totals[dataset]} | - | - | - |")
                continue
            nll_se, rmse_se = ("-" if r["n_splits"] < 2 else f"{r[k]:.3f}" for k in ("nll_se", "rmse_se"))
            lines.append(f"| {dataset} | {method} | {r['n_splits']}/{totals[dataset]} | {r['nll']:.3f} ± {nll_se} | "
                         f"{r['rmse']:.3f} ± {rmse_se} | {r['fit_s']:.1f} |")
    return lines


def write_results(cache: UCICellCache, datasets: list[str], methods: list[str], data_dir: str) -> None:
    """Write benchmarks/results/uci_regression.{json,md} from the cached cells (a hand-written note is kept)."""
    rows = cache.rows(datasets, methods)
    summary = summarise(rows, datasets, methods)
    totals = {d: n_splits(d, data_dir) for d in datasets}
    meta = run_meta()
    write_json(RESULTS / "uci_regression.json", {"meta": meta, "standard_splits": totals, "summary": summary,
                                                 "cells": rows})
    lines = ["# UCI regression: the full protocol", "", (__doc__ or "").split("\n\n", 2)[2].strip(), "",
             "Mean ± standard error over the splits done (n_splits: done / standard); original units. fit s: "
             "the method's own fit on the MAP, mean per split (map: its noise only; MAP training is not counted).", "",
             *table(summary, datasets, methods, totals), "",
             f"Date {meta['date']}; machine {json.dumps(meta['machine'])}; versions {json.dumps(meta['versions'])}"]
    write_markdown_keeping_notes(RESULTS / "uci_regression.md", "\n".join(lines), NOTES)


def main() -> None:
    """Parse the arguments, run the missing cells within the time budget, write the results."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(UCI_DATASETS), choices=UCI_DATASETS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--max-splits", type=int, default=None, help="first N splits only (default: all)")
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "uci_regression"))
    parser.add_argument("--data-dir", default=None, help="folder holding UCI/ (default: $POSTHOC_DATA)")
    parser.add_argument("--time-budget", type=float, default=float("inf"), help="seconds; stop starting cells after")
    parser.add_argument("--report-only", action="store_true", help="only write the results files from the cache")
    args = parser.parse_args()
    try:
        args.data_dir = str(resolve_data_dir(args.data_dir))
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(1)  # small networks: one thread avoids contention on the shared machine
    cache = UCICellCache(args.run_dir)
    previous = RESULTS / "uci_regression.json"
    if previous.is_file():  # cells of an earlier machine's run count as done: only missing cells are computed
        print(f"{cache.import_rows(json.loads(previous.read_text())['cells'])} cells imported from {previous}")
    if not args.report_only:
        run_cells(cache, args.datasets, args.methods, args.data_dir, args.max_splits, time.time() + args.time_budget)
    # the whole table from every cached cell, whichever subset this invocation ran (a subset would drop the rest)
    write_results(cache, list(UCI_DATASETS), list(METHODS), args.data_dir)


if __name__ == "__main__":
    main()
